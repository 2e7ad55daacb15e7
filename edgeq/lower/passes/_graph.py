"""Reading an imported Relax function as a graph: who produces a var, who uses it, constant values.

The integer passes match short chains of bindings (``dequantize -> permute_dims -> matmul -> add``) by
following vars back to the call that produced them; everything here is plain lookups on one function's
dataflow bindings, built once per pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator

from edgeq.errors import EdgeqError, UnsupportedModelError
from edgeq.lower.relax_import import LAYER_KEYS_ATTR, module_json_attr

# Passes run behind TVM's FFI: registered, the error comes back out of ``pass(mod)`` as itself, not RuntimeError.
tvm_ffi.register_error(UnsupportedModelError.__name__, UnsupportedModelError)

__all__ = ["Graph", "QAct", "QWeight", "shape_of", "dtype_of", "match_act_dequant", "match_weight_dequant",
           "LayerNamer", "cached_kernel", "KERNEL_LAYERS_ATTR", "BindingRewriter",
           "rewrite_functions"]


def shape_of(expr: relax.Expr) -> tuple[int, ...]:
    sinfo = expr.ty
    return tuple(int(d) for d in sinfo.shape.values)


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _vars_in(expr: relax.Expr) -> Iterator[relax.Var]:
    if isinstance(expr, relax.Var):
        yield expr
    elif isinstance(expr, relax.Call):
        for arg in expr.args:
            yield from _vars_in(arg)
    elif isinstance(expr, relax.Tuple):
        for field in expr.fields:
            yield from _vars_in(field)
    elif isinstance(expr, relax.TupleGetItem):
        yield from _vars_in(expr.tuple_value)


class Graph:
    """Producers and users of the vars of one Relax function (its ``VarBinding`` s)."""

    def __init__(self, func: relax.Function):
        self.producer: dict[relax.Var, relax.Expr] = {}
        self.users: dict[relax.Var, list[relax.Var]] = {}
        self.returned: set = set()
        for block in func.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    continue
                self.producer[binding.var] = binding.value
                for v in _vars_in(binding.value):
                    self.users.setdefault(v, []).append(binding.var)
        for v in _vars_in(func.body.body):
            self.returned.add(v)
            self.users.setdefault(v, []).append(None)

    def call(self, expr: relax.Expr, op: str) -> Optional[relax.Call]:
        """The call of ``relax.<op>`` that produced ``expr`` (a var), else None."""
        value = self.producer.get(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == f"relax.{op}":
            return value
        return None

    def op_name(self, expr: relax.Expr) -> Optional[str]:
        value = self.producer.get(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            return value.op.name[len("relax."):]
        return None

    def only_user(self, var: relax.Expr) -> Optional[relax.Var]:
        """The single binding var that uses ``var`` (None when used twice, returned, or unused)."""
        users = self.users.get(var, []) if isinstance(var, relax.Var) else []
        return users[0] if len(users) == 1 and users[0] is not None else None

    def const_value(self, expr: relax.Expr) -> Optional[np.ndarray]:
        """``expr`` as a numpy array when it is a constant, or a reshape/permute/astype of one."""
        if isinstance(expr, tvm.ir.expr.Constant):
            return expr.value.numpy()
        value = self.producer.get(expr) if isinstance(expr, relax.Var) else None
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        name = value.op.name
        if name not in ("relax.reshape", "relax.permute_dims", "relax.astype", "relax.squeeze", "relax.expand_dims"):
            return None
        inner = self.const_value(value.args[0])
        if inner is None:
            return None
        if name == "relax.permute_dims":
            axes = value.attrs.axes
            return np.transpose(inner, None if axes is None else [int(a) for a in axes])
        if name == "relax.astype":
            return inner.astype(str(value.attrs.dtype))
        return inner.reshape(shape_of(expr))


@dataclass(frozen=True)
class QAct:
    """A per-tensor quantized activation: integer ``codes`` (a var of the original function) and its grid."""

    codes: relax.Expr
    scale: float
    zero_point: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QWeight:
    """Constant integer weights dequantized per output channel (axis 0)."""

    codes: np.ndarray       # int8, output channel first
    scale: np.ndarray       # float32 [N]
    zero_point: np.ndarray  # int [N]


def _scalar(graph: Graph, expr: relax.Expr) -> Optional[float]:
    value = graph.const_value(expr)
    if value is None or value.size != 1:
        return None
    return value.reshape(())[()].item()


def match_act_dequant(graph: Graph, expr: relax.Expr) -> Optional[QAct]:
    """``expr = R.dequantize(codes, scale, zp)`` of a non-constant int8/uint8 tensor with scalar scale and zp."""
    call = graph.call(expr, "dequantize")
    if call is None:
        return None
    codes, scale, zp = call.args
    if graph.const_value(codes) is not None or dtype_of(codes) not in ("int8", "uint8"):
        return None
    s, z = _scalar(graph, scale), _scalar(graph, zp)
    if s is None or z is None:
        return None
    return QAct(codes, float(np.float32(s)), int(z), dtype_of(codes), shape_of(codes))


def match_weight_dequant(graph: Graph, expr: relax.Expr) -> Optional[QWeight]:
    """``expr = R.dequantize(W const int8, scale[N], zp[N], axis=0)``."""
    call = graph.call(expr, "dequantize")
    if call is None or int(call.attrs.axis) != 0:
        return None
    codes = graph.const_value(call.args[0])
    if codes is None or codes.dtype != np.int8:
        return None
    n = codes.shape[0]
    scale = graph.const_value(call.args[1])
    zp = graph.const_value(call.args[2])
    if scale is None or zp is None:
        return None
    scale = np.broadcast_to(scale.astype(np.float32).reshape(-1), (n,)).copy()
    zp = np.broadcast_to(zp.astype(np.int64).reshape(-1), (n,)).copy()
    return QWeight(codes, scale, zp)


KERNEL_LAYERS_ATTR = "edgeq.kernel_layers"


class LayerNamer:
    """Names for emitted kernels: the edgeq layer (from the module's ``edgeq.layer_keys``) or ``<kind><n>``.

    Relax sanitizes var names (``blocks.0.attn.qkv`` is bound as ``blocks_0_attn_qkv``), so the passes record
    ``{var name: layer}`` in the module attribute ``edgeq.kernel_layers`` (:meth:`record`, :meth:`annotate`).
    """

    def __init__(self, mod: tvm.IRModule):
        self.keys = module_json_attr(mod, LAYER_KEYS_ATTR)
        self.kernel_layers = module_json_attr(mod, KERNEL_LAYERS_ATTR)
        self.count: dict[str, int] = {}
        self.used: set[str] = set(self.kernel_layers.values())

    def record(self, var: relax.Var, layer: str) -> None:
        self.kernel_layers[var.name] = layer

    def annotate(self, mod: tvm.IRModule) -> tvm.IRModule:
        import json

        return mod.with_attr(KERNEL_LAYERS_ATTR, json.dumps(self.kernel_layers, sort_keys=True))

    def name(self, key: Optional[str], kind: str) -> str:
        layer = self.keys.get(key) if key else None
        while layer is None or layer in self.used:
            n = self.count.get(kind, 0)
            self.count[kind] = n + 1
            layer = f"{kind}{n}"
        self.used.add(layer)
        return layer


_KERNEL_CACHE: dict = {}


def cached_kernel(builder, *args, target: tvm.target.Target, **kwargs):
    """``builder(*args, target, **kwargs)`` memoized: a model repeats the same kernel shapes block after block."""
    key = (builder.__module__, builder.__name__, args, str(target), tuple(sorted(kwargs.items())))
    if key not in _KERNEL_CACHE:
        if len(_KERNEL_CACHE) > 256:
            _KERNEL_CACHE.clear()
        _KERNEL_CACHE[key] = builder(*args, target, **kwargs)
    return _KERNEL_CACHE[key]


class BindingRewriter(PyExprMutator):
    """Calls ``self.rewrite(var, call)`` for each binding of the function being visited; a non-None result
    replaces the call. Subclasses are decorated with ``@mutator`` and run by :func:`rewrite_functions`."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.target = target
        self.namer = LayerNamer(mod)
        self.graph: Optional[Graph] = None
        self.current = None
        self.error: Optional[EdgeqError] = None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        self.current = binding.var
        super().visit_var_binding_(binding)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        var = self.current
        if self.error is None and self.graph is not None and var is not None and \
                call.same_as(self.graph.producer.get(var)):
            try:
                out = self.rewrite(var, call)
            except EdgeqError as err:  # raised again after the visit: errors do not cross the FFI intact
                self.error, out = err, None
            if out is not None:
                return out
        return super().visit_call_(call)

    def rewrite(self, var, call) -> Optional[relax.Expr]:  # pragma: no cover - overridden
        raise NotImplementedError


def rewrite_functions(mod: tvm.IRModule, rewriter, record_layers: bool = True) -> tvm.IRModule:
    """Run a binding rewriter (with a ``graph`` attribute) over every Relax function of ``mod``;
    ``record_layers``: annotate the module with the kernels' layers (passes that emit kernels)."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.graph = Graph(func)
            new = rewriter.visit_expr(func)
            if rewriter.error is not None:
                raise rewriter.error
            rewriter.builder_.update_func(gv, new)
    out = rewriter.builder_.get()
    return rewriter.namer.annotate(out) if record_layers else out
