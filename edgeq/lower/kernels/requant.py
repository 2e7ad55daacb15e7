"""Requantization inside the kernels: 32-bit SIMD arithmetic, exactly equal to :func:`reference.requantize`.

The reference rounds ``acc * multiplier / 2**t`` once (``t = 31 + shift``) in int64. 64-bit lanes are slow
on AVX2 (no 64-bit arithmetic shift or min/max) and on NEON, so the kernels compute the same numbers with a
signed *high multiply* (``(a * b) >> 32``, which LLVM lowers to ``vpmuldq`` pairs on x86 and
``smull``/``smull2`` on ARM) and 32-bit shifts::

    a  = clamp(acc, lo, hi) << pre          # pre = max(0, 33 - t): brings every channel to t' = t + pre >= 33
    h  = (a * multiplier) >> 32             # floor
    r  = (h + rnd) >> post                  # post = t' - 32 >= 1, rnd = 2**(post - 1)
    out = clip(r + out_zp, qmin, qmax)

Why it is exact: for ``t' >= 33`` the rounding constant ``2**(t'-1)`` is a multiple of ``2**32``, so
``floor((P + 2**(t'-1)) / 2**t') == floor((floor(P / 2**32) + 2**(t'-33)) / 2**(t'-32))`` for any integer
``P`` (the dropped low word is a fraction below one). Channels with ``t < 33`` (real scale >= 1/4) are
brought to ``t' = 33`` by scaling numerator and denominator by ``2**pre``; the preceding clamp to
``[lo, hi]`` only removes accumulators whose output saturates anyway (``lo``/``hi`` are computed here
per channel, and ``hi << pre`` must fit int32, else :func:`requant_params` refuses the scale).
"""
from __future__ import annotations

import numpy as np
from tvm import tirx

from . import reference as ref

__all__ = ["REQUANT_ROWS", "requant_params", "requantize_with_params", "requant_tir", "requantize_kernel"]

REQUANT_ROWS = ("multiplier", "lo", "hi", "pre", "post", "rnd")


def _floor_div(a: int, b: int) -> int:
    return a // b


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def requant_params(multiplier, shift, n: int, out_zp: int = 0, out_bits: int = 8,
                   out_dtype: str = "int8") -> np.ndarray:
    """Per-channel kernel constants, int32 ``[6, n]`` with rows :data:`REQUANT_ROWS`."""
    qmin, qmax = ref.activation_range(out_bits, out_dtype)
    mult = np.broadcast_to(np.asarray(multiplier, np.int64), (n,))
    shift = np.broadcast_to(np.asarray(shift, np.int64), (n,))
    ref._check_shift(shift)
    if mult.min() < 0 or mult.max() > ref.INT32_MAX:
        raise ValueError("multiplier must be in [0, 2**31)")
    out = np.zeros((6, n), dtype=np.int64)
    for c in range(n):
        m, t = int(mult[c]), 31 + int(shift[c])
        pre = max(0, 33 - t)
        lo, hi = ref.INT32_MIN, ref.INT32_MAX
        if pre and m:
            # smallest hi with r(hi) + zp >= qmax, smallest B with r(-B) + zp <= qmin (r is non-decreasing)
            v = qmax - out_zp
            hi = max(0, _ceil_div(v * 2**t - 2 ** (t - 1), m))
            u = qmin - out_zp
            lo = -max(0, _floor_div(2 ** (t - 1) - (u + 1) * 2**t, m) + 1)
            if (hi << pre) > ref.INT32_MAX or (lo << pre) < ref.INT32_MIN:
                raise ValueError(f"channel {c}: multiplier {m} * 2**-{t} is too large a scale for the kernels")
        elif pre:  # multiplier 0: every output is out_zp; any clamp keeps it that way
            lo, hi = 0, 0
        post = t + pre - 32
        out[:, c] = (m, lo, hi, pre, post, 1 << (post - 1))
    return out.astype(np.int32)


def requantize_with_params(acc, params: np.ndarray, out_zp: int = 0, out_bits: int = 8,
                           out_dtype: str = "int8") -> np.ndarray:
    """Numpy model of the kernels' epilogue (for tests): must equal :func:`reference.requantize`."""
    qmin, qmax = ref.activation_range(out_bits, out_dtype)
    p = params.astype(np.int64)
    a = np.clip(np.asarray(acc).astype(np.int64), p[1], p[2]) << p[3]
    assert a.min(initial=0) >= ref.INT32_MIN and a.max(initial=0) <= ref.INT32_MAX
    h = (a * p[0]) >> 32
    r = (h + p[5]) >> p[4]
    return np.clip(r + out_zp, qmin, qmax).astype(out_dtype)


def requant_tir(acc, rq, n, out_zp: int, out_bits: int, out_dtype: str):
    """The epilogue as a TIR expression; ``rq`` is the ``[6, N]`` int32 buffer, ``n`` the channel index."""
    qmin, qmax = ref.activation_range(out_bits, out_dtype)
    a = tirx.max(tirx.min(acc, rq[2, n]), rq[1, n])
    a = tirx.shift_left(a, rq[3, n])
    h = tirx.Cast("int32", tirx.shift_right(tirx.Cast("int64", a) * tirx.Cast("int64", rq[0, n]),
                                             tirx.const(32, "int64")))
    r = tirx.shift_right(h + rq[5, n], rq[4, n]) + out_zp
    return tirx.Cast(out_dtype, tirx.max(tirx.min(r, qmax), qmin))


def requantize_kernel(shape, target, *, per_channel: bool = False, out_zp: int = 0, out_bits: int = 8,
                      out_dtype: str = "int8", name: str | None = None):
    """Elementwise int32 -> int8/uint8 requantization PrimFunc (e.g. after :func:`log2_av_kernel`).

    Signature ``f(acc[R, L] int32, requant[6, C] int32, out[R, L] out_dtype)``: the tensor of ``shape`` is
    viewed as 2-D (``R = prod(shape[:-1])``, ``L = shape[-1]``; reshape around the call in Relax), ``C`` is
    ``L`` when ``per_channel`` else 1 and ``requant`` comes from :func:`requant_params` (``n = C``).
    Returns ``(func, name)``; semantics: :func:`reference.requantize`.
    """
    import math

    from tvm.s_tir import Schedule
    from tvm.script import tirx as T

    from .micro import as_target, select_microkernel

    shape = tuple(int(s) for s in shape)
    ref.activation_range(out_bits, out_dtype)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    channels = cols if per_channel else 1

    def value(A, RQ, vr, vc):
        ch = vc if per_channel else 0
        return requant_tir(A[vr, vc], RQ, ch, out_zp, out_bits, out_dtype)

    @T.prim_func(s_tir=True)
    def func(A: T.Buffer((rows, cols), "int32"), RQ: T.Buffer((6, channels), "int32"),
             O: T.Buffer((rows, cols), out_dtype)):
        T.func_attr({"tirx.noalias": True})
        for r, c in T.grid(rows, cols):
            with T.sblock("O"):
                vr, vc = T.axis.remap("SS", [r, c])
                O[vr, vc] = value(A, RQ, vr, vc)

    tgt = as_target(target)
    sch = Schedule(func)
    block = sch.get_sblock("O")
    r, c = sch.get_loops(block)
    if select_microkernel(tgt).family == "cuda":
        fused = sch.fuse(r, c)
        bx, tx = sch.split(fused, [None, 256])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    else:
        if rows > 1:
            sch.parallel(r)
        if cols >= 8:
            c_o, c_i = sch.split(c, [None, 8])
            if cols % 8 == 0:
                sch.vectorize(c_i)
    name = name or (f"edgeq_requant_{'x'.join(map(str, shape))}_{'pc' if per_channel else 'pt'}_"
                    f"{out_dtype}b{out_bits}z{out_zp}").replace("-", "m")
    out = sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return out, name
