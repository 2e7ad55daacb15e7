"""Numpy references for edgeq's integer kernels: these functions *define* the integer semantics.

Every compiled kernel in :mod:`edgeq.lower.kernels` is tested bit for bit against the function of the
same name here. Everything is integer arithmetic; no float enters any result except in
:func:`quantize_multiplier`, which turns a real scale into the integer pair the kernels use.

Conventions
-----------
Tensors
    Activations are ``int8`` or ``uint8`` with a zero point ``zp`` (an ``int`` in the dtype's range),
    so the real value is ``scale * (q - zp)``. Weights are symmetric ``int8`` (zero point 0), one scale
    per output channel. Int4 weights are stored packed, two per byte (see :func:`pack_int4`).

Accumulation
    Products and sums are exact in int64 and the result is taken modulo 2**32 (``int32``, two's
    complement). With ``|x - zp| <= 255`` and ``|w| <= 128`` no wrap happens while
    ``K <= 65793``; the kernels wrap in the same way if it ever does.

Requantization (``int32 -> int8``), the fixed-point scheme of :func:`requantize`
    A real multiplier ``s > 0`` is represented by ``multiplier`` (int32 in ``[2**30, 2**31)``) and
    ``shift`` (int) with ``s ~= multiplier * 2**-(31 + shift)``; see :func:`quantize_multiplier`.
    With ``t = 31 + shift`` (``1 <= t <= 62``)::

        r   = (acc * multiplier + 2**(t-1)) >> t          # int64, arithmetic shift = floor
        out = clip(r + out_zp, qmin, qmax)               # still int64, then cast

    i.e. a *single* rounding, round-half-up (ties toward +infinity: 2.5 -> 3, -2.5 -> -2),
    of the exact product ``acc * multiplier / 2**t``. This is not gemmlowp's two-step
    SaturatingRoundingDoublingHighMul + RoundingDivideByPOT (which can differ by one on ties).
    ``qmin, qmax`` are ``-2**(b-1), 2**(b-1)-1`` for a signed output of ``b = out_bits`` bits stored
    in int8, and ``0, 2**b - 1`` for uint8.

Log2 attention probabilities (:func:`log2_av`)
    A probability ``p`` is stored as a code ``c`` (uint8) with ``p ~= 2**-c``; codes
    ``c >= zero_code`` mean ``p = 0``. Multiplications by ``p`` become shifts::

        acc[h,t,d] = sum_j  floor( (v[h,j,d] - v_zp) * 2**S / 2**c[h,t,j] )   over codes c < zero_code

    with a fixed base shift ``S = base_shift`` (0..23), so ``acc * 2**-S * v_scale`` is the real
    ``p @ v``. The floor is an arithmetic right shift (``((v - v_zp) << S) >> c``, shift amounts
    above 31 behave as 31, which is the same floor). Worst case ``T * 255 * 2**S < 2**31`` keeps it
    free of wrap (S = 15 allows T <= 257).

    Log-sqrt(2) codes read as log2 (edgeq's post-Softmax quantizer, ``odd_multiplier=M``, ``frac_bits=F``):
    a code ``c`` stands for ``p = 2**-ceil(c/2) * (2**F + (c mod 2) * M) / 2**F``. ``v`` is prepared once in
    two forms, exact because ``S >= F``::

        v0 = (v - v_zp) << S;   v1 = (v - v_zp) * (2**F + M) << (S - F)      # v * 2**S and v * 2**S * mant
        e = (c + 1) >> 1;  a = min(e, 31)
        term = v_{c & 1} >> a                                                 # floored, like log2 codes

    Every term is ``floor((v - v_zp) * 2**S * p / s)``, so ``acc * 2**-S * s * v_scale`` is ``p @ v`` less at
    most ``T`` units of ``2**-S * v_scale`` (a bias of about ``T / 2`` units: with the base shifts the
    lowering picks, S = 14 at T = 197 without a softmax bound and S = 21 with one, at most 0.012 and 1e-4 of
    ``v_scale``, far below the output's own quantization step). Floored, a term is a load, one shift and one
    add per vector; rounding half up added a rounding constant per term and cost about 10 % more time on
    AVX-512 (``bench/kernels.py --threads 1 --clock thread``, deit_tiny's shapes: 0.309 against 0.280 ms, medians
    of three interleaved runs).

    Headroom (:func:`log2_av_max_shift`): per term ``255 * 2**S * (2**F + M) / 2**F < 2**30``, and for the
    sum ``sum_j |term_j| < 2**31``, i.e. ``Tk * 255 * 2**S * mant_max`` in general, or ``255 * 2**S * B + Tk``
    when the caller has proved ``sum_j p_j / s <= B`` (softmax probabilities: ``B ~ 1.19 / s``, see
    :mod:`edgeq.lower.passes.attention`). The int32 sum is taken modulo 2**32 anyway, so only the final value
    must fit; it does under either bound.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "activation_range",
    "quantize_multiplier",
    "quantize_multipliers",
    "requantize",
    "pack_int4",
    "unpack_int4",
    "weights_as_int8",
    "qlinear_acc",
    "qlinear",
    "qmatmul_qk",
    "log2_av",
    "log2_av_max_shift",
    "check_log2_sqrt2",
]

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
MAX_TOTAL_SHIFT = 62  # (2**31 * 2**31 + 2**61) < 2**63: the int64 product plus rounding never overflows
MAX_BASE_SHIFT = 23  # 255 * 2**23 < 2**31


def activation_range(out_bits: int = 8, out_dtype: str = "int8") -> tuple[int, int]:
    """(qmin, qmax) of a ``out_bits``-bit activation stored in ``out_dtype`` (int8 or uint8)."""
    if out_dtype not in ("int8", "uint8"):
        raise ValueError(f"out_dtype must be int8 or uint8, not {out_dtype!r}")
    if not 2 <= out_bits <= 8:
        raise ValueError(f"out_bits must be in 2..8, not {out_bits}")
    if out_dtype == "int8":
        return -(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1
    return 0, 2**out_bits - 1


def quantize_multiplier(real_scale: float) -> tuple[int, int]:
    """Integer ``(multiplier, shift)`` with ``real_scale ~= multiplier * 2**-(31 + shift)``.

    ``multiplier`` lies in ``[2**30, 2**31)`` (31 significant bits, relative error <= 2**-31) unless the
    scale is so small that the total shift would pass 62; then the multiplier is reduced instead
    (``total shift == 62``). ``real_scale == 0`` gives ``(0, 0)``. Scales of ``2**30`` or more are refused.
    """
    s = float(real_scale)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"real_scale must be finite and >= 0, got {real_scale!r}")
    if s == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    multiplier = int(round(mantissa * 2**31))
    if multiplier == 2**31:  # mantissa rounded up to 1.0
        multiplier //= 2
        exponent += 1
    shift = -exponent
    total = 31 + shift
    if total < 1:
        raise ValueError(f"real_scale {s} is too large for a 31-bit fixed-point multiplier (must be < 2**30)")
    if total > MAX_TOTAL_SHIFT:
        excess = total - MAX_TOTAL_SHIFT
        multiplier = (multiplier + (1 << (excess - 1))) >> excess
        shift = MAX_TOTAL_SHIFT - 31
    return int(multiplier), int(shift)


def quantize_multipliers(real_scales) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_multiplier` over an array of scales: (multiplier int32[N], shift int32[N])."""
    scales = np.atleast_1d(np.asarray(real_scales, dtype=np.float64))
    pairs = [quantize_multiplier(s) for s in scales.ravel()]
    mult = np.array([p[0] for p in pairs], dtype=np.int64).reshape(scales.shape)
    shift = np.array([p[1] for p in pairs], dtype=np.int64).reshape(scales.shape)
    return mult.astype(np.int32), shift.astype(np.int32)


def _check_shift(shift: np.ndarray) -> None:
    total = shift.astype(np.int64) + 31
    if total.size and (total.min() < 1 or total.max() > MAX_TOTAL_SHIFT):
        raise ValueError(f"31 + shift must lie in [1, {MAX_TOTAL_SHIFT}], got shifts {shift.min()}..{shift.max()}")


def requantize(acc, multiplier, shift, out_zp: int = 0, out_bits: int = 8, out_dtype: str = "int8") -> np.ndarray:
    """int32 accumulator -> ``out_dtype`` with the fixed-point scheme in the module docstring.

    ``multiplier`` and ``shift`` broadcast against ``acc`` (per-tensor scalars or per-channel arrays
    over the last axis).
    """
    qmin, qmax = activation_range(out_bits, out_dtype)
    acc64 = np.asarray(acc).astype(np.int32).astype(np.int64)
    mult = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    _check_shift(shift)
    if mult.size and (mult.min() < 0 or mult.max() > INT32_MAX):
        raise ValueError("multiplier must be in [0, 2**31)")
    total = 31 + shift
    r = (acc64 * mult + (np.int64(1) << (total - 1))) >> total
    return np.clip(r + int(out_zp), qmin, qmax).astype(out_dtype)


def pack_int4(w) -> np.ndarray:
    """int8 weights in [-8, 7], shape [N, K] -> uint8 [N, ceil(K/2)], two's-complement nibbles.

    Byte ``j`` of row ``n`` holds ``w[n, 2j]`` in its low nibble and ``w[n, 2j+1]`` in its high
    nibble (0 when ``2j+1 == K``).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"int4 weights must be 2-D [N, K], got shape {w.shape}")
    if w.size and (w.min() < -8 or w.max() > 7):
        raise ValueError("int4 weights must lie in [-8, 7]")
    n, k = w.shape
    padded = np.zeros((n, k + (k % 2)), dtype=np.int16)
    padded[:, :k] = w
    nib = (padded & 0xF).astype(np.uint8)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, k: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 [N, ceil(K/2)] -> int8 [N, K]."""
    p = np.asarray(packed, dtype=np.uint8)
    if p.ndim != 2 or p.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed int4 weights for K={k} must have shape [N, {(k + 1) // 2}], got {p.shape}")
    lo = (p & 0xF).astype(np.int16)
    hi = (p >> 4).astype(np.int16)
    both = np.empty((p.shape[0], 2 * p.shape[1]), dtype=np.int16)
    both[:, 0::2] = lo
    both[:, 1::2] = hi
    both = np.where(both >= 8, both - 16, both)
    return both[:, :k].astype(np.int8)


def weights_as_int8(w, k: int) -> np.ndarray:
    """int8 weights as given, or uint8 packed int4 weights unpacked; always int8 [N, K]."""
    w = np.asarray(w)
    if w.dtype == np.int8:
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"int8 weights must have shape [N, {k}], got {w.shape}")
        return w
    if w.dtype == np.uint8:
        return unpack_int4(w, k)
    raise ValueError(f"weights must be int8 [N, K] or packed int4 uint8 [N, ceil(K/2)], got {w.dtype}")


def _check_activation(x, zp: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.int8, np.uint8):
        raise ValueError(f"{name} must be int8 or uint8, got {x.dtype}")
    info = np.iinfo(x.dtype)
    if not info.min <= int(zp) <= info.max:
        raise ValueError(f"{name} zero point {zp} is outside the range of {x.dtype}")
    return x


def qlinear_acc(x, x_zp: int, w, bias=None) -> np.ndarray:
    """``acc[m, n] = sum_k (x[m, k] - x_zp) * w[n, k] + bias[n]`` as int32 (modulo 2**32).

    ``x``: int8/uint8 [M, K]; ``w``: int8 [N, K] or packed int4 uint8 [N, ceil(K/2)];
    ``bias``: int32 [N] or None.
    """
    x = _check_activation(x, x_zp, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got {x.shape}")
    w8 = weights_as_int8(w, x.shape[1])
    acc = (x.astype(np.int64) - int(x_zp)) @ w8.astype(np.int64).T
    if bias is not None:
        acc = acc + np.asarray(bias, dtype=np.int64)
    return acc.astype(np.int32)


def qlinear(x, x_zp: int, w, bias, multiplier, shift, out_zp: int = 0, out_bits: int = 8,
            out_dtype: str = "int8") -> np.ndarray:
    """Quantized linear layer: :func:`qlinear_acc` then per-output-channel :func:`requantize`.

    ``multiplier``/``shift``: int32 [N] (or scalars) from :func:`quantize_multipliers` of
    ``x_scale * w_scale[n] / out_scale``.
    """
    acc = qlinear_acc(x, x_zp, w, bias)
    return requantize(acc, multiplier, shift, out_zp, out_bits, out_dtype)


def qmatmul_qk(q, k, q_zp: int = 0, k_zp: int = 0) -> np.ndarray:
    """Attention scores in integers: ``s[h, i, j] = sum_d (q[h,i,d] - q_zp) * (k[h,j,d] - k_zp)``.

    ``q``, ``k``: int8/uint8 [H, T, D] (``k`` may have its own T); result int32 [H, Tq, Tk].
    """
    q = _check_activation(q, q_zp, "q")
    k = _check_activation(k, k_zp, "k")
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [H, T, D] with equal H and D, got {q.shape} and {k.shape}")
    qs = q.astype(np.int64) - int(q_zp)
    ks = k.astype(np.int64) - int(k_zp)
    return np.einsum("hid,hjd->hij", qs, ks).astype(np.int32)


def log2_av_max_shift(tk: int, odd_multiplier: int | None = None, frac_bits: int = 0,
                      prob_sum: float | None = None) -> int:
    """The largest ``base_shift`` for which :func:`log2_av` over ``tk`` terms can neither wrap nor overflow.

    ``prob_sum``: a proven bound on ``sum_j p_j / s`` over one output row (``p_j`` the dequantized code
    values); without it every probability may be the largest one (``tk`` times code 0).
    """
    if odd_multiplier is None:
        mant, min_shift = 1.0, 0
    else:
        mant, min_shift = (2**frac_bits + int(odd_multiplier)) / 2**frac_bits, frac_bits
    # log-sqrt(2) terms keep a factor 2 of headroom, as when they were rounded half up (the rounding constant
    # took up to 2**30): S = 21 already puts the terms' floor far below the output's quantization step
    room = 2**31 if odd_multiplier is None else 2**30

    def fits(shift: int) -> bool:
        per_term = 255 * mant * 2**shift
        per_sum = tk * per_term if prob_sum is None else 255 * 2**shift * float(prob_sum) + tk
        return per_term < room and per_sum < 2**31

    if prob_sum is not None and not (math.isfinite(prob_sum) and prob_sum > 0):
        raise ValueError(f"prob_sum must be a finite positive bound, got {prob_sum!r}")
    if not fits(min_shift):
        raise ValueError(f"log2_av cannot be exact for tk={tk}, odd_multiplier={odd_multiplier}, frac_bits={frac_bits}")
    shift = min_shift
    while shift < MAX_BASE_SHIFT and fits(shift + 1):
        shift += 1
    return shift


def log2_av(p_code, v, v_zp: int = 0, base_shift: int = 15, zero_code: int = 255,
            odd_multiplier: int | None = None, frac_bits: int = 0) -> np.ndarray:
    """``softmax(.) @ v`` with log2-quantized probabilities, multiplies replaced by shifts.

    ``p_code``: uint8 [H, T, Tk] (``p ~= 2**-code``, codes ``>= zero_code`` are 0);
    ``v``: int8/uint8 [H, Tk, D]; result int32 [H, T, D] in units of ``2**-base_shift * v_scale``.
    With ``odd_multiplier`` the codes are log-sqrt(2) codes read as log2 (``2**-ceil(c/2)`` times the
    odd-code mantissa, ``base_shift >= frac_bits``), each term floored. See the module docstring.
    """
    p = np.asarray(p_code)
    if p.dtype != np.uint8:
        raise ValueError(f"p_code must be uint8, got {p.dtype}")
    v = _check_activation(v, v_zp, "v")
    if p.ndim != 3 or v.ndim != 3 or p.shape[0] != v.shape[0] or p.shape[2] != v.shape[1]:
        raise ValueError(f"p_code must be [H, T, Tk] and v [H, Tk, D], got {p.shape} and {v.shape}")
    if not 0 <= base_shift <= MAX_BASE_SHIFT:
        raise ValueError(f"base_shift must be in 0..{MAX_BASE_SHIFT}, got {base_shift}")
    if not 0 <= zero_code <= 256:
        raise ValueError(f"zero_code must be in 0..256, got {zero_code}")
    centered = v.astype(np.int64) - int(v_zp)
    c = p.astype(np.int64)
    live = c < zero_code
    if odd_multiplier is None:
        forms = np.stack([centered << base_shift])        # [1, H, Tk, D]
        which = np.zeros_like(c)
        amount = np.minimum(c, 31)
    else:
        check_log2_sqrt2(base_shift, odd_multiplier, frac_bits)
        v1 = centered * (2**frac_bits + int(odd_multiplier)) << (base_shift - frac_bits)
        forms = np.stack([centered << base_shift, v1])
        which = c & 1
        amount = np.minimum((c + 1) >> 1, 31)
    # terms[h, t, j, d] = forms[which, h, j, d] >> amount[h, t, j]; summed over j without [H,T,Tk,D]
    out = np.zeros((p.shape[0], p.shape[1], v.shape[2]), dtype=np.int64)
    heads = np.arange(p.shape[0])[:, None]
    for j in range(p.shape[2]):
        vj = forms[which[:, :, j], heads, j, :]             # [H, T, D]
        term = vj >> amount[:, :, j, None]
        out += np.where(live[:, :, j, None], term, 0)
    return out.astype(np.int32)


def check_log2_sqrt2(base_shift: int, odd_multiplier: int, frac_bits: int) -> None:
    """Refuse a log-sqrt(2) reading :func:`log2_av` cannot take (ranges; ``v1`` exact needs S >= F)."""
    if not 1 <= frac_bits <= 16 or not 0 <= int(odd_multiplier) < 2**frac_bits:
        raise ValueError(f"odd_multiplier {odd_multiplier} / frac_bits {frac_bits} out of range")
    if base_shift < frac_bits:
        raise ValueError(f"base_shift {base_shift} must be >= frac_bits {frac_bits} for log-sqrt(2) codes")
    if 255 * (2**frac_bits + int(odd_multiplier)) << (base_shift - frac_bits) >= 2**30:
        raise ValueError(f"base_shift {base_shift} overflows int32 with the odd-code mantissa")
