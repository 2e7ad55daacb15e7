"""Pass: float division by a scalar constant becomes multiplication by its float32 reciprocal.

The float glue between integer kernels divides twice per element: GELU's ``x / sqrt(2)`` and every activation
quantize (``x / scale``). A vector division costs several multiplications (AVX-512 ``vdivps`` issues about once
every 10 cycles, a multiply twice per cycle), and in deit_tiny's fc1 epilogue glue (dequantize, GELU,
quantize) the divisions were the loop's bottleneck.

``x * (1 / c)`` can differ from ``x / c`` in the last bit. The rewrite happens in the graph, before any code is
generated, so every target computes the same bits (board and host libraries still agree exactly); against the
fake-quant model a code moves only when ``x / c`` lies within one ulp of a rounding boundary.
A quantize keeps its zero point and output type and divides by 1.0 (exact; LLVM drops it).

Both rewrites are ``relax.dpl`` patterns (an op whose divisor is a constant) with ``rewrite_call``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

__all__ = ["MultiplyByReciprocal"]


def _reciprocal(value: np.ndarray) -> Optional[np.ndarray]:
    """``1 / value`` rounded to float32 (same shape), for a finite, nonzero float32 scalar; else None."""
    if value.dtype != np.float32 or value.size != 1:
        return None
    c = np.float64(value.reshape(()))
    if c == 0 or not np.isfinite(c):
        return None
    inverse = np.float32(1.0 / c)
    return inverse.reshape(value.shape) if np.isfinite(inverse) and inverse != 0 else None


_X, _C, _ZP = wildcard(), is_const(), wildcard()
_DIVIDE = is_op("relax.divide")(_X, _C)
_QUANTIZE = is_op("relax.quantize")(_X, _C, _ZP)


def _by_reciprocal(call: relax.Call, matches) -> relax.Expr:
    scale = matches[_C].value.numpy()
    inverse = _reciprocal(scale)
    # a quantize already dividing by 1.0 is left alone: rewrite_call repeats until nothing matches
    if inverse is None or (call.op.name == "relax.quantize" and np.all(scale == 1)):
        return call
    scaled = relax.op.multiply(matches[_X], relax.const(inverse))
    if call.op.name == "relax.divide":
        return scaled
    return relax.op.quantize(scaled, relax.const(np.ones(inverse.shape, np.float32)), matches[_ZP],
                             call.attrs.axis, str(call.attrs.out_dtype))


@tvm.transform.module_pass(opt_level=0, name="edgeq.MultiplyByReciprocal")
class MultiplyByReciprocal:
    """``x / c`` and ``quantize(x, c, zp)`` with a scalar float32 constant ``c`` -> ``x * (1/c)``."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = mod
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = rewrite_call(_DIVIDE | _QUANTIZE, _by_reciprocal, func)
        return relax.transform.Normalize()(out)
