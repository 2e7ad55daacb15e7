"""The numpy references that define edgeq's integer semantics, and the kernels' requantization rewrite."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.micro import MICROKERNELS, pack_weight_panels
from edgeq.lower.kernels.requant import requant_params, requantize_with_params


def test_quantize_multiplier_represents_the_scale():
    rng = np.random.default_rng(0)
    for s in np.concatenate([rng.uniform(1e-6, 1.0, 200), [0.5, 0.25, 1.0, 3.0, 1e-9, 2.0**-40]]):
        m, sh = ref.quantize_multiplier(s)
        assert 0 < m < 2**31
        approx = m * 2.0 ** -(31 + sh)
        assert abs(approx - s) <= s * 2.0**-30 or (31 + sh == 62)
        if 31 + sh < 62:
            assert 2**30 <= m
    assert ref.quantize_multiplier(0.0) == (0, 0)
    assert ref.quantize_multiplier(0.75) == (3 * 2**29, 0)
    with pytest.raises(ValueError):
        ref.quantize_multiplier(-1.0)
    with pytest.raises(ValueError):
        ref.quantize_multiplier(2.0**31)


def test_requantize_rounds_half_up_once():
    # scale 1/2: multiplier 2**30, shift 0 -> t = 31; (acc * 2**30 + 2**30) >> 31 = floor(acc/2 + 1/2)
    acc = np.array([5, -5, 3, -3, 1, -1, 0, 400, -400], dtype=np.int32)
    out = ref.requantize(acc, 2**30, 0, out_zp=0)
    assert out.tolist() == [3, -2, 2, -1, 1, 0, 0, 127, -128]
    assert ref.requantize(acc, 2**30, 0, out_zp=10, out_bits=4).tolist() == [7, 7, 7, 7, 7, 7, 7, 7, -8]
    assert ref.requantize(np.array([-300, 7, 600]), 2**30, 0, 5, 8, "uint8").tolist() == [0, 9, 255]


def test_int4_pack_round_trip():
    rng = np.random.default_rng(1)
    for k in (1, 2, 7, 13, 192):
        w = rng.integers(-8, 8, (5, k)).astype(np.int8)
        p = ref.pack_int4(w)
        assert p.dtype == np.uint8 and p.shape == (5, (k + 1) // 2)
        assert np.array_equal(ref.unpack_int4(p, k), w)
    # low nibble is the even k: [1, -1] -> 0x F1
    assert ref.pack_int4(np.array([[1, -1]], np.int8)).tolist() == [[0xF1]]
    with pytest.raises(ValueError):
        ref.pack_int4(np.array([[8]], np.int8))


def test_qlinear_acc_matches_exact_float_math():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (6, 11)).astype(np.uint8)
    w = rng.integers(-128, 128, (4, 11)).astype(np.int8)
    bias = rng.integers(-100, 100, 4).astype(np.int32)
    acc = ref.qlinear_acc(x, 130, w, bias)
    expect = (x.astype(np.float64) - 130) @ w.astype(np.float64).T + bias
    assert np.array_equal(acc, expect.astype(np.int64))
    w4 = rng.integers(-8, 8, (4, 11)).astype(np.int8)
    assert np.array_equal(ref.qlinear_acc(x, 3, ref.pack_int4(w4)), ref.qlinear_acc(x, 3, w4))


def test_qk_and_log2_av_small_cases():
    q = np.array([[[1, 2], [3, -4]]], np.int8)
    k = np.array([[[5, 6], [-7, 8], [0, 1]]], np.int8)
    assert ref.qmatmul_qk(q, k).tolist() == [[[17, 9, 2], [-9, -53, -4]]]
    assert ref.qmatmul_qk(q, k, 1, 1)[0, 0, 0] == 0 * 4 + 1 * 5
    # p codes: 0 -> 1, 1 -> 1/2, 255 -> 0 ; S = 2: values are in quarters
    p = np.array([[[0, 1, 255]]], np.uint8)
    v = np.array([[[4], [-3], [100]]], np.int8)
    # 4 << 2 >> 0 = 16 ; -3 << 2 >> 1 = -6 ; zero code dropped
    assert ref.log2_av(p, v, 0, base_shift=2).tolist() == [[[10]]]
    # codes above the base shift floor: -3 << 0 >> 1 = -2 (floor of -1.5)
    assert ref.log2_av(np.array([[[1]]], np.uint8), np.array([[[-3]]], np.int8), 0, base_shift=0).tolist() == [[[-2]]]
    assert ref.log2_av(np.array([[[40]]], np.uint8), np.array([[[-3]]], np.int8), 0, base_shift=0).tolist() == [[[-1]]]


def test_log_sqrt2_av_floors_every_term():
    """Each term is floor((v - zp) * 2**S * p): the sum lies within T units below the exact product."""
    rng = np.random.default_rng(5)
    h, t, s, d, shift, mult, frac = 2, 5, 40, 6, 14, 53, 7
    codes = np.minimum(rng.geometric(0.08, (h, t, s)) - 1, 255).astype(np.uint8)
    codes[0, 0, :3] = 255
    v = rng.integers(0, 256, (h, s, d)).astype(np.uint8)
    got = ref.log2_av(codes, v, 100, shift, 255, mult, frac).astype(np.int64)
    c = codes.astype(np.int64)
    mant = np.where(c % 2 == 1, (2**frac + mult) / 2**frac, 1.0)
    p = np.where(c < 255, mant * 2.0 ** -((c + 1) // 2), 0.0)
    exact = np.einsum("hts,hsd->htd", p * 2.0**shift, v.astype(np.float64) - 100)
    assert (got <= exact + 1e-9).all() and (exact - got < s).all()
    assert (exact - got).mean() > 1  # floored, not rounded: inexact terms lose half a unit on average
    # one term by hand: code 3 (2**-2 * 181/128), v - zp = -3, S = 14: floor(-3 * 181 * 2**7 / 4) = -17376
    one = ref.log2_av(np.array([[[3]]], np.uint8), np.array([[[-3]]], np.int8), 0, shift, 255, mult, frac)
    assert one.tolist() == [[[-3 * 181 * 2**7 // 4]]]


@pytest.mark.parametrize("out_dtype,out_bits,out_zp", [("int8", 8, 0), ("int8", 8, -7), ("uint8", 8, 128),
                                                       ("int8", 4, 2), ("uint8", 6, 5)])
def test_kernel_requant_rewrite_is_exact(out_dtype, out_bits, out_zp):
    rng = np.random.default_rng(3)
    n = 64
    scales = np.concatenate([rng.uniform(1e-6, 0.2, n - 16), rng.uniform(0.25, 4.0, 8),
                             [0.25, 0.5, 1.0, 2.0, 1e-12, 0.0, 1e3, 2.0**-33]])
    mult, shift = ref.quantize_multipliers(scales)
    params = requant_params(mult, shift, n, out_zp, out_bits, out_dtype)
    acc = np.concatenate([rng.integers(-2**31, 2**31, (200, n)), rng.integers(-3000, 3000, (200, n)),
                          np.full((1, n), ref.INT32_MIN), np.full((1, n), ref.INT32_MAX)]).astype(np.int32)
    # half-way points of every channel
    t = 31 + shift.astype(np.int64)
    ties = np.clip((2 * np.arange(-5, 6)[:, None] + 1) * 2 ** (t - 1) // np.maximum(mult, 1), ref.INT32_MIN,
                   ref.INT32_MAX).astype(np.int32)
    acc = np.concatenate([acc, ties, ties + 1, ties - 1])
    expect = ref.requantize(acc, mult, shift, out_zp, out_bits, out_dtype)
    assert np.array_equal(requantize_with_params(acc, params, out_zp, out_bits, out_dtype), expect)


def test_weight_panels_layout():
    w = np.arange(5 * 7).reshape(5, 7).astype(np.int8)
    micro = MICROKERNELS["x86_avx2"]  # kg=2, nb=16
    p = pack_weight_panels(w, micro, 8)
    assert p.shape == (1, 4, 32)
    assert p[0, 1, 2 * 3 + 1] == w[3, 3] and p[0, 3, 2 * 4 + 1] == 0  # k = 7 is padding
    w4 = np.clip(w, -8, 7) - 4
    p4 = pack_weight_panels(w4, micro, 4)
    assert p4.shape == (1, 4, 16) and p4.dtype == np.uint8
    # byte i: lane i in the low nibble, lane i + 16 in the high one (two's complement)
    low = (p4.astype(np.int8) << 4) >> 4
    high = p4.astype(np.int8) >> 4
    assert np.array_equal(np.concatenate([low, high], axis=-1), pack_weight_panels(w4, micro, 8))
    assert p4[0, 1, 3] & 0xF == w4[1, 3] & 0xF and p4[0, 1, 3] >> 4 == 0  # lane 19 is channel 9: padding
