"""Pass: float division by a scalar constant becomes multiplication by its float32 reciprocal.

The float glue between integer kernels divides twice per element: GELU's ``x / sqrt(2)`` and every activation
quantize (``x / scale``). A vector division costs several multiplications (AVX-512 ``vdivps`` issues about once
every 10 cycles, a multiply twice per cycle), and in deit_tiny's fc1 epilogue glue (dequantize, GELU,
quantize) the divisions were the loop's bottleneck.

``x * (1 / c)`` can differ from ``x / c`` in the last bit. The rewrite happens in the graph, before any code is
generated, so every target computes the same bits (board and host libraries still agree exactly); against the
fake-quant model a code moves only when ``x / c`` lies within one ulp of a rounding boundary.
A quantize keeps its zero point and output type and divides by 1.0 (exact; LLVM drops it).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from ._graph import BindingRewriter, rewrite_functions

__all__ = ["MultiplyByReciprocal"]


def _reciprocal(value: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """``1 / value`` rounded to float32, for a finite, nonzero float32 scalar; else None."""
    if value is None or value.dtype != np.float32 or value.size != 1:
        return None
    c = np.float64(value.reshape(()))
    if c == 0 or not np.isfinite(c):
        return None
    inverse = np.float32(1.0 / c)
    return inverse if np.isfinite(inverse) and inverse != 0 else None


@mutator
class _ReciprocalRewriter(BindingRewriter):
    def rewrite(self, var, call):
        op = self.graph.op_name(var)
        if op == "divide":
            inverse = _reciprocal(self.graph.const_value(call.args[1]))
            if inverse is None:
                return None
            shape = self.graph.const_value(call.args[1]).shape
            return relax.op.multiply(self.visit_expr(call.args[0]), relax.const(inverse.reshape(shape)))
        if op == "quantize":
            scale = self.graph.const_value(call.args[1])
            inverse = _reciprocal(scale)
            if inverse is None:
                return None
            scaled = self.builder_.emit(relax.op.multiply(self.visit_expr(call.args[0]),
                                                          relax.const(inverse.reshape(scale.shape))))
            return relax.op.quantize(scaled, relax.const(np.ones(scale.shape, np.float32)),
                                     self.visit_expr(call.args[2]), call.attrs.axis, str(call.attrs.out_dtype))
        return None


@tvm.transform.module_pass(opt_level=0, name="edgeq.MultiplyByReciprocal")
class MultiplyByReciprocal:
    """``x / c`` and ``quantize(x, c, zp)`` with a scalar float32 constant ``c`` -> ``x * (1/c)``."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _ReciprocalRewriter(mod, None), record_layers=False)
