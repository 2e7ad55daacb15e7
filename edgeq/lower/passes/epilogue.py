"""Pass: the float ops after an integer Linear, up to the next quantize or residual add, move into its epilogue.

Matched, after :class:`~edgeq.lower.passes.qlinear.FuseQLinear` and
:class:`~edgeq.lower.passes.reciprocal.MultiplyByReciprocal` (fc1 -> GELU -> quantize in a ViT block)::

    acc = R.call_tir(qlinear_int32, (x, w, bias))       # the kernel that returns to float
    y   = astype(acc, float32) * scale[N] [+ residual[N]]
    ... elementwise ops on y with scalar constants (multiply, add, subtract, divide, erf; a Clip's
        maximum/minimum, which the ONNX import emits as call_tir), reshapes that keep the last axis ...
    q   = R.quantize(t, s, zp)                          # scalar s and zp, int8/uint8

where every intermediate is used only inside the chain. Emitted: one call of the same kernel rebuilt with a
:class:`~edgeq.lower.kernels.epilogue.FloatTail` that writes ``q``'s codes (``dequant`` = [scale; residual]).
The int32 accumulator is never written to memory and the glue PrimFunc that re-read it is gone. The tail
repeats the legalized ops in their order, so the fused build's codes equal the unfused build's bit for bit.

A residual add is a terminal too (:func:`match_residual`: fc2 and the attention proj of a ViT block)::

    y   = astype(acc, float32) * scale[N] [+ residual[N]]   [-> reshape]
    out = R.add(stream, y)                              # either order; out float32, read by LayerNorm and the next add

Emitted: the kernel with a float32 tail that reads ``stream`` as an extra input and writes ``out``.

Only CPU (``llvm``) kernels are rebuilt; GPU builds keep the separate glue.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import mutator

from edgeq.compile.targets import as_tvm_target
from edgeq.lower.kernels.epilogue import TAIL_OPS, FloatTail
from edgeq.lower.kernels.qlinear import qlinear_kernel
from edgeq.lower.kernels.relax_glue import emit_call

from ._graph import BindingRewriter, Graph, cached_kernel, rewrite_functions, shape_of

__all__ = ["FuseQLinearEpilogue", "TailMatch", "match_tail", "match_residual"]

QLINEAR_ARGS_ATTR = "edgeq.qlinear"


@dataclass
class TailMatch:
    accumulator: relax.Var        # the int32 qlinear call's result
    kernel: relax.Call            # that call
    build_args: dict              # its qlinear_kernel arguments
    dequant: np.ndarray           # float32 [1 or 2, N]: scale, bias residual
    tail: FloatTail
    inputs: tuple = ()            # the Relax tensors the tail's extra inputs read (a residual stream)


def _same_layout(shape: tuple[int, ...], m: int, n: int) -> bool:
    """A row-major ``[..., n]`` tensor whose elements are the ``[m, n]`` accumulator's in the same order."""
    return len(shape) >= 1 and shape[-1] == n and int(np.prod(shape)) == m * n


def _scalar_value(graph: Graph, expr: relax.Expr) -> Optional[np.ndarray]:
    """A constant, or the ONNX import's ``where(isnan(c), inf, c)`` guard around a Clip bound, as numpy."""
    value = graph.const_value(expr)
    if value is not None:
        return value
    where = graph.call(expr, "where")
    if where is not None:
        cond, a, b = (_scalar_value(graph, arg) for arg in where.args)
        return None if cond is None or a is None or b is None else np.where(cond, a, b)
    isnan = graph.call(expr, "isnan")
    if isnan is not None:
        inner = _scalar_value(graph, isnan.args[0])
        return None if inner is None else np.isnan(inner)
    return None


def _scalar(graph: Graph, expr: relax.Expr) -> Optional[float]:
    value = _scalar_value(graph, expr)
    if value is None or value.size != 1 or value.dtype != np.float32:
        return None
    return float(value.reshape(()))


def _channel_const(graph: Graph, expr: relax.Expr, n: int) -> Optional[np.ndarray]:
    value = graph.const_value(expr)
    if value is None or value.dtype != np.float32 or value.size != n or value.shape[-1:] != (n,):
        return None
    return value.reshape(n)


def _extremum_op(mod: tvm.IRModule, call: relax.Call) -> Optional[str]:
    """"maximum"/"minimum" for a ``call_tir`` of a PrimFunc that stores ``max(A[i], b[()])`` (``min``): how the
    ONNX import emits Clip with tensor bounds."""
    if len(call.args[1].fields) != 2 or call.args[0] not in mod.get_global_vars():
        return None
    func = mod[call.args[0]]
    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    stores: list = []
    tvm_ffi.structural_map(func.body, [(tvm.tirx.BufferStore, lambda st: stores.append(st) or st)])
    if len(stores) != 1:
        return None
    value = stores[0].value
    kind = {tvm.tirx.expr.Max: "maximum", tvm.tirx.expr.Min: "minimum"}.get(type(value))
    a, b = (getattr(value, "a", None), getattr(value, "b", None))
    loads_element = isinstance(a, tvm.ir.expr.TensorLoad) and len(a.indices) == len(stores[0].indices) and all(
        i.same_as(j) for i, j in zip(a.indices, stores[0].indices))
    loads_scalar = isinstance(b, tvm.ir.expr.TensorLoad) and len(b.indices) == 0
    return kind if kind and loads_element and loads_scalar else None


class _TailBuilder:
    """Walks back from the quantize's input to the dequantized accumulator, collecting the ops in SSA order."""

    def __init__(self, graph: Graph, mod: tvm.IRModule, input_var: Optional[relax.Var] = None):
        self.graph, self.mod = graph, mod
        self.input_var = input_var  # read as the extra input ("input", 0), not followed
        self.ops: list[tuple] = []
        self.index: dict = {}      # var -> value index
        self.inner: set = set()    # vars whose every use must stay inside the chain
        self.base: Optional[relax.Var] = None
        self.found: Optional[tuple] = None  # (accumulator var, kernel call, build args, dequant rows)

    def operand(self, expr: relax.Expr):
        const = _scalar(self.graph, expr)
        if const is not None:
            return ("const", const)
        if not isinstance(expr, relax.Var):
            return None
        if self.input_var is not None and expr.same_as(self.input_var):
            return ("input", 0)
        return self.value(expr)

    def value(self, var: relax.Var):
        if var in self.index:
            return ("value", self.index[var])
        if self.base is None and self._dequant_base(var):
            self.index[var] = 0
            return ("value", 0)
        op = self.graph.op_name(var)
        if op is None:
            return None
        call = self.graph.producer[var]
        operands = list(call.args)
        if op == "call_tir":  # a Clip bound, as the ONNX import emits it
            op, operands = _extremum_op(self.mod, call), list(call.args[1].fields)
        if op == "reshape":
            inner = self.operand(operands[0])
            if inner is None or inner[0] != "value":
                return None
            self.inner.add(var)
            self.index[var] = inner[1]
            return inner
        if op not in TAIL_OPS:
            return None
        args = [self.operand(a) for a in operands[: 1 if op == "erf" else 2]]
        if any(a is None for a in args) or all(a[0] == "const" for a in args):
            return None
        self.ops.append((op, *args))
        self.inner.add(var)
        self.index[var] = len(self.ops)
        return ("value", len(self.ops))

    def _dequant_base(self, var: relax.Var) -> bool:
        """``var = astype(acc) * scale [+ residual]`` with ``acc`` an int32 qlinear kernel's output."""
        graph = self.graph
        scaled = var
        add = graph.call(var, "add")
        if add is not None:
            scaled, residual_expr = add.args
            if not isinstance(scaled, relax.Var):
                return False
        mul = graph.call(scaled, "multiply")
        cast_var = mul.args[0] if mul is not None else None
        cast = graph.call(cast_var, "astype") if isinstance(cast_var, relax.Var) else None
        if cast is None or str(cast.attrs.dtype) != "float32" or not isinstance(cast.args[0], relax.Var):
            return False
        acc = cast.args[0]
        kernel = graph.producer.get(acc)
        if not (isinstance(kernel, relax.Call) and isinstance(kernel.op, tvm.ir.Op)
                and kernel.op.name == "relax.call_tir"):
            return False
        func = self.mod[kernel.args[0]] if kernel.args[0] in self.mod.get_global_vars() else None
        attrs = func.attrs if func is not None else None
        if attrs is None or QLINEAR_ARGS_ATTR not in attrs:
            return False
        build_args = json.loads(str(attrs[QLINEAR_ARGS_ATTR]))
        n = int(build_args["n"])
        if build_args["out_dtype"] != "int32" or len(kernel.args[1].fields) != 3:
            return False
        scale = _channel_const(graph, mul.args[1], n)
        if scale is None:
            return False
        rows = [scale]
        if add is not None:
            residual = _channel_const(graph, residual_expr, n)
            if residual is None:
                return False
            rows.append(residual)
        self.base = var
        self.inner.update([acc, cast_var, scaled])
        self.found = (acc, kernel, build_args, np.stack(rows).astype(np.float32))
        return True


def _matched(graph: Graph, builder: _TailBuilder, terminal: relax.Var, top, make_tail) -> Optional[TailMatch]:
    """The match once ``builder`` walked from ``terminal``'s operand down to a kernel (``top``: that operand), if
    every var of the chain has the accumulator's layout and no user outside the chain."""
    if top is None or builder.found is None:
        return None
    acc, kernel, build_args, dequant = builder.found
    m, n = int(build_args["m"]), int(build_args["n"])
    chain = builder.inner | {builder.base, terminal}
    for var in builder.inner | {builder.base}:
        if not _same_layout(shape_of(var), m, n) or any(user not in chain for user in graph.users.get(var, [])):
            return None
    if not _same_layout(shape_of(terminal), m, n):
        return None
    inputs = (builder.input_var,) if builder.input_var is not None else ()
    return TailMatch(acc, kernel, build_args, dequant, make_tail(tuple(builder.ops)), inputs)


def match_tail(graph: Graph, mod: tvm.IRModule, qvar: relax.Var, quantize: relax.Call) -> Optional[TailMatch]:
    """The fusable chain ending at ``qvar = quantize(...)`` (module docstring), or None."""
    scale = _scalar(graph, quantize.args[1])
    zp = graph.const_value(quantize.args[2])
    dtype = str(quantize.attrs.out_dtype)
    if scale is None or zp is None or zp.size != 1 or dtype not in ("int8", "uint8") or \
            not isinstance(quantize.args[0], relax.Var):
        return None
    builder = _TailBuilder(graph, mod)
    top = builder.value(quantize.args[0])

    def make_tail(ops):
        if top[1] != len(ops):  # the quantize reads the last op (or the base itself when there are none)
            ops = ops + (("multiply", top, ("const", 1.0)),)
        return FloatTail(ops, scale, int(zp.reshape(())), dtype)

    return _matched(graph, builder, qvar, top, make_tail)


def match_residual(graph: Graph, mod: tvm.IRModule, var: relax.Var, add: relax.Call) -> Optional[TailMatch]:
    """``var = add(stream, y)`` (either order) with ``y`` a fusable chain from a kernel and ``stream`` any float32
    tensor of the same layout (the residual stream): the kernel then reads ``stream`` and writes ``var``."""
    a, b = add.args
    if not (isinstance(a, relax.Var) and isinstance(b, relax.Var)) or str(var.ty.dtype) != "float32" or \
            shape_of(a) != shape_of(b) or shape_of(a) != shape_of(var):
        return None
    for stream, chain, first in ((a, b, True), (b, a, False)):
        builder = _TailBuilder(graph, mod, input_var=stream)
        top = builder.value(chain)
        if top is None:
            continue
        last = (("input", 0), top) if first else (top, ("input", 0))
        found = _matched(graph, builder, var, top,
                         lambda ops: FloatTail(ops + (("add", *last),), 1.0, 0, "float32", inputs=1))
        if found is not None:
            return found
    return None


@mutator
class _EpilogueRewriter(BindingRewriter):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod, target)
        self.source = mod

    def rewrite(self, var, call):
        op = self.graph.op_name(var)
        if op == "quantize":
            match = match_tail(self.graph, self.source, var, call)
        elif op == "add":
            match = match_residual(self.graph, self.source, var, call)
        else:
            return None
        if match is None:
            return None
        args = dict(match.build_args)
        m, k, n = args.pop("m"), args.pop("k"), args.pop("n")
        kernel = cached_kernel(qlinear_kernel, m, k, n, target=self.target, epilogue=match.tail,
                               dequant_rows=int(match.dequant.shape[0]), **args)
        x, w, bias = (self.visit_expr(a) for a in match.kernel.args[1].fields)
        inputs = [self.visit_expr(v) if shape_of(v) == kernel.out_shape else
                  self.builder_.emit(relax.op.reshape(self.visit_expr(v), kernel.out_shape)) for v in match.inputs]
        name = match.accumulator.name
        out = emit_call(self.builder_, kernel.func, kernel.name, [x, w, bias, match.dequant, *inputs],
                        kernel.out_shape, kernel.out_dtype, name_hint=name)
        if name in self.namer.kernel_layers:  # the layer the int32 kernel was recorded as
            self.namer.record(out, self.namer.kernel_layers[name])
        return out if shape_of(var) == kernel.out_shape else relax.op.reshape(out, shape_of(var))


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseQLinearEpilogue")
class FuseQLinearEpilogue:
    """Float tails after int32 qlinear kernels -> the kernels' epilogues (see the module docstring)."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.target.kind.name != "llvm":
            return mod
        return relax.transform.DeadCodeElimination()(rewrite_functions(mod, _EpilogueRewriter(mod, self.target)))
