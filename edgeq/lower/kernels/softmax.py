"""Row softmax kernels: float probabilities, or straight to log2 codes (no probability tensor, one log per row).

Both read ``scores[R, S]`` and make the same three passes over a row: its maximum ``m`` and ``sum_i exp(z_i - m)``,
each as 16 lane partials (each in index order) combined in lane order, then the output. ``softmax_kernel``
writes ``p_j = exp(z_j - m) * (1 / sum)``; ``softmax_log2_codes_kernel`` writes the codes below.

edgeq's post-Softmax quantizer turns a probability ``p`` into ``code = clamp(round(-a * log2(p / s)), 0, Z)``
(``a = 2`` for log-sqrt(2) codes, ``a = 1`` for log2 codes, ``Z`` the zero code, ``p == 0`` -> ``Z``). With
``p_j = exp(z_j - m) / sum_i exp(z_i - m)`` (``m`` the row's maximum) the log needs no per-element call::

    -log2(p_j) = (m - z_j) * log2(e) + log2(sum_i exp(z_i - m))
    code_j     = clamp(round(a * (m - z_j) * log2(e) + a * log2(sum) + a * log2(s)), 0, Z)

so each element costs a subtract, a multiply-add and a round; the exponentials only feed the row's sum and the
one ``log2`` per row is a short polynomial. Both are written out here in IEEE operations (no libm: the board's
library must give the host's bits) and every reduction keeps a fixed order (16 partial maxima/sums, each in
index order, then combined in lane order), so the x86 and aarch64 builds agree bit for bit.

Against the float chain it replaces (softmax, divide, log, multiply, round, clamps) the codes differ only
where ``-a * log2(p / s)`` lies within float32 rounding of a half integer (the same few-ulp differences every
backend's exp and log already have). A probability that float32 rounds to 0 (``-log2(p) > 150``) gets ``Z``,
as the chain's ``p > 0`` test does.

PrimFuncs: ``f(scores[R, S] float32 | int32, codes[R, S] uint8)``; int32 scores are a ``q @ k^T`` accumulator,
read as ``float32(acc) * in_scale`` (the same float32 product the dequantize it replaces computes);
``f(scores[R, S] float32, probs[R, S] float32)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T
from tvm.s_tir import Schedule

from .qlinear import parallel, root_blocks, vectorize

__all__ = ["SoftmaxKernel", "softmax_kernel", "softmax_log2_codes_kernel", "softmax_log2_codes_reference",
           "UNDERFLOW_LOG2"]

LANES = 16  # partial maxima / sums per row: independent chains, one AVX-512 vector (two AVX2, four NEON)
LOG2E = 1.4426950408889634
#: ``-log2(p)`` beyond which float32 rounds ``p`` to 0 (half the smallest subnormal, 2**-150)
UNDERFLOW_LOG2 = 150.0
_EXP_FLOOR = -87.0  # exp(-87) ~ 1.6e-38 is still normal, so 2**n below stays a plain exponent field
_LN2_HI = 0.693145751953125  # 15 significant bits: n * _LN2_HI is exact for |n| <= 2**8
_LN2_LO = 1.4286068203094172e-06
_SQRT2 = 1.4142135623730951


def _f32(value: float):
    return tirx.const(float(np.float32(value)), "float32")


def _let(name: str, value, body):
    """``body(v)`` with ``v`` bound to ``value`` once: the polynomials reuse their argument many times, and a
    repeated subexpression would be repeated in the TIR (and in compile time) at every use."""
    var = tirx.Var(name, value.ty.dtype)
    return tirx.Let(var, value, body(var))


def exp_nonpositive(x):
    """``exp(x)`` for ``x <= 0`` in float32 IEEE operations (``x < -87`` gives ``exp(-87)``, negligible in a sum
    that holds ``exp(0) = 1``): ``2**n * P(r)`` with ``r = x - n ln2`` (two-part ln2), ``P`` Taylor to ``r**7``
    (relative error below 1e-8 on ``|r| <= ln2 / 2``)."""

    def with_n(x, n):
        def with_r(r):
            poly = _f32(1.0 / math.factorial(7))
            for k in range(6, -1, -1):
                poly = poly * r + _f32(1.0 / math.factorial(k))
            return poly * tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
        return _let("r", x - n * _f32(_LN2_HI) - n * _f32(_LN2_LO), with_r)

    return _let("x", tirx.max(x, _f32(_EXP_FLOOR)),
                lambda x: _let("n", tirx.round(x * _f32(LOG2E)), lambda n: with_n(x, n)))


def log2_positive(x):
    """``log2(x)`` for a normal ``x > 0`` in float32 IEEE operations: exponent field plus
    ``2 atanh(t) / ln 2`` of the mantissa folded into ``[sqrt(2)/2, sqrt(2))`` (``|t| <= 0.172``, series to ``t**9``)."""

    def from_bits(bits):
        exponent = tirx.shift_right(bits, 23) - 127
        mant = tirx.reinterpret("float32", tirx.bitwise_or(tirx.bitwise_and(bits, 0x7FFFFF), 0x3F800000))
        big = mant > _f32(_SQRT2)
        exponent = exponent + tirx.Cast("int32", big)

        def from_t(t):
            t2 = t * t
            series = _f32(1.0 / 9)
            for k in (7, 5, 3, 1):
                series = series * t2 + _f32(1.0 / k)
            return tirx.Cast("float32", exponent) + t * series * _f32(2.0 * LOG2E)

        def from_mant(m):
            return _let("t", (m - _f32(1.0)) / (m + _f32(1.0)), from_t)

        return _let("mant", tirx.Select(big, mant * _f32(0.5), mant), from_mant)

    return _let("bits", tirx.reinterpret("int32", x), from_bits)


@dataclass
class SoftmaxKernel:
    func: tirx.PrimFunc
    name: str
    rows: int
    length: int
    in_dtype: str
    out_dtype: str

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.rows, self.length)


def softmax_kernel(rows: int, length: int, target=None, *, name: str | None = None,
                   num_tasks: int | None = None) -> SoftmaxKernel:
    """Scheduled PrimFunc: float32 softmax over the rows of ``scores[rows, length]`` (module docstring); ``target``
    as for :func:`softmax_log2_codes_kernel`."""
    if min(rows, length) < 1:
        raise ValueError(f"shapes must be positive, got rows={rows} length={length}")

    def element(drop, inv_sum):
        return exp_nonpositive(-drop) * inv_sum

    func = _row_softmax_func(rows, length, "float32", None, "float32", lambda total: _f32(1.0) / total, element)
    func = _schedule(func, num_tasks or 8)
    name = name or f"edgeq_softmax_r{rows}s{length}"
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return SoftmaxKernel(func, name, rows, length, "float32", "float32")


def softmax_log2_codes_kernel(rows: int, length: int, target=None, *, alpha: int, log2_scale: float, zero_code: int,
                              in_dtype: str = "float32", in_scale: float | None = None, name: str | None = None,
                              num_tasks: int | None = None) -> SoftmaxKernel:
    """Scheduled PrimFunc: row-wise softmax of ``scores[rows, length]`` quantized to log2 codes (module docstring).

    ``alpha``: 2 (log-sqrt(2) codes) or 1 (log2 codes); ``log2_scale``: ``log2(s)`` of the quantizer's scale;
    ``zero_code``: the code read as 0 (and given to clamped or vanished probabilities); ``in_dtype`` int32 needs
    ``in_scale``. ``target`` is accepted for a uniform kernel-builder signature (the schedule is plain
    vectorized TIR for every CPU).
    """
    if alpha not in (1, 2):
        raise ValueError(f"alpha must be 1 or 2, not {alpha}")
    if not 1 <= zero_code <= 255:
        raise ValueError(f"zero_code must be in 1..255, not {zero_code}")
    if in_dtype not in ("float32", "int32") or (in_dtype == "int32") != (in_scale is not None):
        raise ValueError("scores are float32, or int32 with in_scale")
    if min(rows, length) < 1:
        raise ValueError(f"shapes must be positive, got rows={rows} length={length}")
    code_slope, code_offset = _f32(alpha * LOG2E), _f32(alpha * float(log2_scale))

    def element(drop, log2_sum):  # drop = m - z >= 0
        lp = drop * _f32(LOG2E) + log2_sum  # -log2(p)
        rounded = tirx.max(tirx.round(drop * code_slope + (log2_sum * _f32(alpha) + code_offset)), _f32(0.0))
        keep = tirx.all(rounded < _f32(zero_code), lp <= _f32(UNDERFLOW_LOG2))
        return tirx.Cast("uint8", tirx.Select(keep, rounded, _f32(zero_code)))

    func = _row_softmax_func(rows, length, in_dtype, in_scale, "uint8", log2_positive, element)
    func = _schedule(func, num_tasks or 8)
    if name is None:
        tag = f"{in_dtype}" + ("" if in_scale is None else f"x{np.float32(in_scale).view(np.uint32):08x}")
        name = (f"edgeq_softmaxcodes_r{rows}s{length}_a{alpha}_l{np.float32(log2_scale).view(np.uint32):08x}"
                f"_z{zero_code}_{tag}")
    func = func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    return SoftmaxKernel(func, name, rows, length, in_dtype, "uint8")


def _row_softmax_func(R: int, S: int, in_dtype: str, in_scale: float | None, out_dtype: str, row_stat,
                      element) -> tirx.PrimFunc:
    """The three passes over each row; ``row_stat(sum)`` is kept per row, ``element(m - z, stat)`` is written."""
    L = LANES
    main = S // L  # full lane groups; the last S % L elements go to the first lanes afterwards
    tail = S - main * L
    has_main = main > 0
    neg_inf = _f32(-np.inf)

    def score(Z, r, j):
        if in_dtype == "int32":
            return tirx.Cast("float32", Z[r, j]) * _f32(in_scale)
        return Z[r, j]

    def output(Z, M, LS, r, j):
        return _let("drop", M[r] - score(Z, r, j), lambda drop: element(drop, LS[r]))

    def lane_max(PM, Z, r, lane):
        """Lane ``lane``'s partial maximum, with the tail element ``main * L + lane`` when there is one."""
        tail_score = score(Z, r, tirx.min(main * L + lane, S - 1)) if tail else neg_inf
        return tirx.max(PM[r, lane], tail_score) if main else tail_score

    @T.prim_func(s_tir=True)
    def func(Z: T.Buffer((R, S), in_dtype), Out: T.Buffer((R, S), out_dtype)):
        T.func_attr({"tirx.noalias": True})
        PM = T.sblock_alloc_buffer((R, L), "float32")
        M = T.sblock_alloc_buffer((R,), "float32")
        PS = T.sblock_alloc_buffer((R, L), "float32")
        LS = T.sblock_alloc_buffer((R,), "float32")
        if has_main:
            for r, i, l in T.grid(R, main, L):
                with T.sblock("PM"):
                    vr, vi, vl = T.axis.remap("SRS", [r, i, l])
                    with T.init():
                        PM[vr, vl] = neg_inf
                    PM[vr, vl] = T.max(PM[vr, vl], score(Z, vr, vi * L + vl))
        for r, l in T.grid(R, L):
            with T.sblock("M"):
                vr, vl = T.axis.remap("SR", [r, l])
                T.reads(PM[vr, 0:L], Z[vr, 0:S])
                with T.init():
                    M[vr] = neg_inf
                M[vr] = T.max(M[vr], lane_max(PM, Z, vr, vl))
        if has_main:
            for r, i, l in T.grid(R, main, L):
                with T.sblock("PS"):
                    vr, vi, vl = T.axis.remap("SRS", [r, i, l])
                    with T.init():
                        PS[vr, vl] = T.float32(0)
                    PS[vr, vl] = PS[vr, vl] + exp_nonpositive(score(Z, vr, vi * L + vl) - M[vr])
        for r in T.serial(R):
            with T.sblock("LS"):
                vr = T.axis.remap("S", [r])
                T.reads(PS[vr, 0:L], M[vr], Z[vr, 0:S])
                T.writes(LS[vr])
                LS[vr] = row_stat(_row_sum(PS, Z, M, vr, main, tail, score))
        for r, j in T.grid(R, S):
            with T.sblock("C"):
                vr, vj = T.axis.remap("SS", [r, j])
                Out[vr, vj] = output(Z, M, LS, vr, vj)

    return func


def _row_sum(PS, Z, M, r, main: int, tail: int, score):
    """The row's exp sum in a fixed order: lane by lane, each lane's tail element after its partial sum."""
    total = None
    for lane in range(LANES):
        part = PS[r, lane] if main else None
        if lane < tail:
            e = exp_nonpositive(score(Z, r, main * LANES + lane) - M[r])
            part = e if part is None else part + e
        if part is not None:
            total = part if total is None else total + part
    return total


def _schedule(func: tirx.PrimFunc, num_tasks: int) -> tirx.PrimFunc:
    sch = Schedule(func)
    blocks = root_blocks(sch)
    b_c = blocks["C"]
    r, j = sch.get_loops(b_c)
    rows = int(sch.get(r).extent)
    chunks = max(1, min(num_tasks, rows))
    task, row = sch.split(r, [chunks, None])
    parallel(sch, task)
    for name in ("LS", "PS", "M", "PM"):
        if name in blocks:
            sch.compute_at(blocks[name], row)
    for name in ("PM", "PS"):
        if name in blocks:
            loops = sch.get_loops(blocks[name])
            vectorize(sch, loops[-1])
            sch.decompose_reduction(blocks[name], loops[-2])
    vectorize(sch, sch.get_loops(b_c)[-1])
    return sch.mod["main"]


def softmax_log2_codes_reference(scores: np.ndarray, *, alpha: int, log2_scale: float, zero_code: int,
                                 in_scale: float | None = None) -> np.ndarray:
    """The codes in float64 (rows of the last axis): what the kernel computes up to float32 rounding."""
    if in_scale is None:
        z = np.asarray(scores, np.float32).astype(np.float64)
    else:  # the kernel's float32 product
        z = (np.asarray(scores).astype(np.float32) * np.float32(in_scale)).astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lp = (m - z) * LOG2E + np.log2(np.exp(z - m).sum(axis=-1, keepdims=True))
    value = alpha * lp + alpha * log2_scale
    codes = np.maximum(np.round(value), 0)
    return np.where((codes < zero_code) & (lp <= UNDERFLOW_LOG2), codes, zero_code).astype(np.uint8)
