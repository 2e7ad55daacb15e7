"""Relax graphs of edgeq's post-Softmax log2 quantizer as :func:`edgeq.lower.relax_import.import_onnx` makes them
from the export (ONNX ``Max`` imports as ``max(stack(...), axis=0)``, ``Cast`` to uint8 via int32 and ``& 255``)."""
from __future__ import annotations

import numpy as np
from tvm import relax

MULT, FRAC = 106, 8


def f32(v) -> relax.Expr:
    return relax.const(np.asarray(v, np.float32))


def quantize_half(bb, x, scale, zero_code, alpha: float = 2.0):
    """Export's ``log_codes``: codes = where(x/s > 0 and t < Z, t, Z), t = max(round(-alpha log2(x/s)), 0)."""
    shape = x.ty.shape
    ratio = bb.emit(relax.op.divide(x, f32(scale)))
    positive = bb.emit(relax.op.greater(ratio, f32(0.0)))
    safe = bb.emit(relax.op.where(positive, ratio, f32(1.0)))
    t = bb.emit(relax.op.round(bb.emit(relax.op.multiply(bb.emit(relax.op.log(safe)), f32(-alpha / np.log(2.0))))))
    stacked = bb.emit(relax.op.stack([bb.emit(relax.op.broadcast_to(t, shape)),
                                      bb.emit(relax.op.broadcast_to(f32(0.0), shape))], axis=0))
    t = bb.emit(relax.op.max(stacked, axis=[0], keepdims=False))
    keep = bb.emit(relax.op.logical_and(positive, bb.emit(relax.op.less(t, f32(zero_code)))))
    code = bb.emit(relax.op.where(keep, t, f32(zero_code)))
    code = bb.emit(relax.op.where(bb.emit(relax.op.logical_not(bb.emit(relax.op.isfinite(code)))), f32(0.0), code))
    code = bb.emit(relax.op.bitwise_and(bb.emit(relax.op.astype(code, "int32")), relax.const(np.int32(255))))
    return bb.emit(relax.op.astype(code, "uint8"))


def dequant_half(bb, codes, scale, zero_code):
    c = bb.emit(relax.op.astype(codes, "float32"))
    half = bb.emit(relax.op.multiply(c, f32(0.5)))
    even = bb.emit(relax.op.multiply(bb.emit(relax.op.floor(half)), f32(2.0)))
    odd = bb.emit(relax.op.subtract(c, even))
    mant = bb.emit(relax.op.add(bb.emit(relax.op.multiply(odd, f32(MULT))), f32(2.0**FRAC)))
    mant = bb.emit(relax.op.multiply(mant, f32(1.0 / 2**FRAC)))
    power = bb.emit(relax.op.power(f32(2.0), bb.emit(relax.op.negative(bb.emit(relax.op.ceil(half))))))
    value = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(mant, power)), f32(scale)))
    return bb.emit(relax.op.where(bb.emit(relax.op.equal(c, f32(zero_code))), f32(0.0), value))
