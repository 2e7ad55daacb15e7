"""Float epilogues of the integer GEMM: the float ops between a layer's accumulator and the next layer's codes.

A Linear whose output goes through float ops before it is quantized again (fc1 -> GELU -> quantize) leaves the
kernel as int32, returns to float with its per-channel scale and bias residual, runs the elementwise ops, and is
quantized. :class:`FloatTail` describes that chain after the dequantization, as a short list of scalar ops, so
that the qlinear kernel can compute it on each output tile while it is still in registers instead of writing
int32 to memory for a separate pass (:mod:`edgeq.lower.passes.epilogue` finds the chains).

The tail is built from the same TIR operations, in the same order, as TVM's legalization of the Relax ops it
replaces (``erf`` as FastMathTransform's ``topi.fast_erf``, ``quantize`` as ``clip(round(x / s) + zp)``), and
the pipeline's :func:`~edgeq.lower.pipeline.fence_float_products` treats the fused kernel like any other
PrimFunc, so the fused build computes every code bit for bit as the unfused one did, on every target.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

__all__ = ["FloatTail", "TAIL_OPS", "Operand"]

#: the elementwise ops a tail may hold
TAIL_OPS = ("multiply", "add", "subtract", "divide", "maximum", "minimum", "erf")

#: an operand: ``("value", i)`` (0: the dequantized input, i > 0: the result of op i - 1), ``("const", c)``, or
#: ``("input", j)``: the same element of the kernel's extra float32 input ``j`` (a residual stream)
Operand = tuple[str, Union[int, float]]


@dataclass(frozen=True)
class FloatTail:
    """``quantize(ops(x))``: ``ops`` in SSA order, each ``(op, operand, ...)``; the last result is quantized to
    ``out_dtype`` with ``scale`` and ``zero_point`` (Relax ``quantize``: ``clip(round(v / scale) + zp)``), or with
    ``out_dtype`` float32 written as it is. ``inputs``: how many extra float32 tensors the ops read."""

    ops: tuple[tuple, ...]
    scale: float
    zero_point: int
    out_dtype: str
    inputs: int = 0

    def __post_init__(self):
        if self.out_dtype not in ("int8", "uint8", "float32"):
            raise ValueError(f"a float tail writes int8, uint8 or float32, not {self.out_dtype!r}")
        if self.out_dtype != "float32":
            info = np.iinfo(self.out_dtype)
            if not info.min <= self.zero_point <= info.max:
                raise ValueError(f"zero point {self.zero_point} outside {self.out_dtype}")
        if self.inputs not in (0, 1):
            raise ValueError(f"a float tail reads at most one extra input, not {self.inputs}")
        for i, (op, *args) in enumerate(self.ops):
            if op not in TAIL_OPS:
                raise ValueError(f"op {op!r} is not one of {TAIL_OPS}")
            if len(args) != (1 if op == "erf" else 2):
                raise ValueError(f"op {i} ({op}) has {len(args)} operands")
            for kind, ref in args:
                if kind == "value" and not 0 <= int(ref) <= i:
                    raise ValueError(f"op {i} reads value {ref}, which is not computed before it")
                if kind == "input" and not 0 <= int(ref) < self.inputs:
                    raise ValueError(f"op {i} reads input {ref} of {self.inputs}")
                if kind not in ("value", "const", "input"):
                    raise ValueError(f"operand kind {kind!r}")

    @property
    def key(self) -> str:
        """A short digest of the tail, for kernel names (one PrimFunc per distinct tail)."""
        text = repr((self.ops, np.float32(self.scale).tobytes(), self.zero_point, self.out_dtype, self.inputs))
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def expr(self, x: tirx.PrimExpr, inputs: Sequence[tirx.PrimExpr] = ()) -> tirx.PrimExpr:
        """The output (code, or float32 value) for the float32 value ``x`` and the extra inputs' elements
        ``inputs`` (TIR expressions)."""
        lets: list[tuple[tirx.Var, tirx.PrimExpr]] = []
        value = self._ops_expr(x, lets, inputs)
        if self.out_dtype == "float32":
            return _with_lets(value, lets)
        scaled = value / tirx.const(float(np.float32(self.scale)), "float32")
        info = np.iinfo(self.out_dtype)
        code = tirx.round(scaled) + tirx.const(float(self.zero_point), "float32")
        out = tirx.Cast(self.out_dtype, tirx.max(tirx.min(code, tirx.const(float(info.max), "float32")),
                                                 tirx.const(float(info.min), "float32")))
        return _with_lets(out, lets)

    def float_expr(self, x: tirx.PrimExpr, inputs: Sequence[tirx.PrimExpr] = ()) -> tirx.PrimExpr:
        """The float32 value the ops give ``x``, before the quantize (what tests compare bit for bit)."""
        lets: list[tuple[tirx.Var, tirx.PrimExpr]] = []
        return _with_lets(self._ops_expr(x, lets, inputs), lets)

    def _ops_expr(self, x: tirx.PrimExpr, lets: list, inputs: Sequence[tirx.PrimExpr] = ()) -> tirx.PrimExpr:
        if len(inputs) != self.inputs:
            raise ValueError(f"the tail reads {self.inputs} extra inputs, {len(inputs)} given")
        uses = [0] * (len(self.ops) + 1)
        for _, *args in self.ops:
            for kind, ref in args:
                if kind == "value":
                    uses[int(ref)] += 1
        values: list[tirx.PrimExpr] = [self._bound(x, 0, uses, lets)]
        for i, (op, *args) in enumerate(self.ops):
            operands = [values[int(ref)] if kind == "value" else inputs[int(ref)] if kind == "input"
                        else tirx.const(float(np.float32(ref)), "float32") for kind, ref in args]
            values.append(self._bound(_apply(op, operands), i + 1, uses, lets))
        return values[-1]

    @staticmethod
    def _bound(value: tirx.PrimExpr, index: int, uses: list[int], lets: list) -> tirx.PrimExpr:
        """A value read by several ops is computed once (a ``Let``), like the buffer the unfused glue reads."""
        if uses[index] < 2 or isinstance(value, (tirx.Var, tirx.FloatImm)):
            return value
        var = tirx.Var(f"t{index}", "float32")
        lets.append((var, value))
        return var


def _with_lets(expr: tirx.PrimExpr, lets: list) -> tirx.PrimExpr:
    for var, value in reversed(lets):
        expr = tirx.Let(var, value, expr)
    return expr


def _apply(op: str, operands: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    if op == "erf":
        return fast_erf(operands[0])
    a, b = operands
    return {"multiply": lambda: a * b, "add": lambda: a + b, "subtract": lambda: a - b,
            "divide": lambda: a / b, "maximum": lambda: tirx.max(a, b), "minimum": lambda: tirx.min(a, b)}[op]()


_ERF_TEMPLATE: list = []


def fast_erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """TVM's ``topi.fast_erf`` of ``x``: the very expression FastMathTransform gives a legalized ``R.erf``
    (taken from topi, not rewritten here, so the two cannot drift apart)."""
    if not _ERF_TEMPLATE:
        from tvm import te, topi

        placeholder = te.placeholder((1,), "float32", "erf_input")
        func = te.create_prim_func([placeholder, topi.fast_erf(placeholder)])
        stores: list = []
        tvm_ffi.structural_map(func.body, [(tirx.BufferStore, lambda s: stores.append(s) or s)])
        (store,) = stores
        _ERF_TEMPLATE.append(store.value)  # its only loads read the placeholder
    var = tirx.Var("erf_x", "float32")
    return tirx.Let(var, x, tvm_ffi.structural_map(_ERF_TEMPLATE[0], [(tvm.ir.expr.TensorLoad, lambda _load: var)]))
