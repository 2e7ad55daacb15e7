"""Quantizer arithmetic against hand-computed values and error bounds."""
from __future__ import annotations

import math

import pytest
import torch

from edgeq.quant import quantizers as Q

pytestmark = pytest.mark.usefixtures("single_thread")


def test_int_ranges():
    assert Q.int_range(8, signed=False, symmetric=False) == (0, 255)
    assert Q.int_range(8, signed=True, symmetric=False) == (-128, 127)
    assert Q.int_range(8, signed=True, symmetric=True) == (-127, 127)
    assert Q.int_range(2, signed=False, symmetric=False) == (0, 3)
    assert Q.int_range(3, signed=True, symmetric=True) == (-3, 3)


def test_asymmetric_hand_values():
    # range [0, 3] on 2 bits: scale 1, zero point 0; round half to even
    scale, zp = Q.uniform_params(torch.tensor(0.0), torch.tensor(3.0), 0, 3, symmetric=False)
    assert float(scale) == 1.0 and float(zp) == 0.0
    x = torch.tensor([0.0, 1.4, 1.6, 2.5, 3.7, -0.8])
    assert Q.quantize(x, scale, zp, 0, 3).tolist() == [0, 1, 2, 2, 3, 0]
    # range [-1, 3] on 3 bits unsigned: scale 4/7, zero point round(1.75) = 2
    scale, zp = Q.uniform_params(torch.tensor(-1.0), torch.tensor(3.0), 0, 7, symmetric=False)
    assert float(scale) == pytest.approx(4 / 7) and float(zp) == 2.0
    assert Q.fake_quant(torch.tensor([0.0]), scale, zp, 0, 7).item() == 0.0  # zero is exact


def test_symmetric_hand_values():
    scale, zp = Q.uniform_params(torch.tensor(-2.0), torch.tensor(3.0), -3, 3, symmetric=True)
    assert float(scale) == 1.0 and float(zp) == 0.0
    x = torch.tensor([-3.6, -0.4, 0.5, 1.5, 2.49])
    assert Q.quantize(x, scale, zp, -3, 3).tolist() == [-3, 0, 0, 2, 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_step(bits, symmetric):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(bits))
    qmin, qmax = Q.int_range(bits, signed=symmetric, symmetric=symmetric)
    scale, zp = Q.uniform_params(x.min(), x.max(), qmin, qmax, symmetric)
    err = (Q.fake_quant(x, scale, zp, qmin, qmax) - x).abs()
    assert float(err.max()) <= float(scale) / 2 * (1 + 1e-5)
    # the step halves with every extra bit (asymmetric: exactly range / (2^b - 1))
    if not symmetric:
        assert float(scale) == pytest.approx(float(x.max() - x.min()) / (2 ** bits - 1), rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_per_channel_weights_bound_per_row(bits):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=gen) * torch.logspace(-2, 1, 16).unsqueeze(1)
    scale, zp, qmin, qmax = Q.weight_params(weight, bits, symmetric=False, percentiles=(1.0,))
    codes = Q.quantize_weight(weight, scale, zp, qmin, qmax)
    assert codes.min() >= qmin and codes.max() <= qmax and qmin == -(2 ** (bits - 1))
    assert bool(((zp >= qmin) & (zp <= qmax)).all())
    recon = (codes - zp.unsqueeze(1)) * scale.unsqueeze(1)
    assert bool(((recon - weight).abs() <= scale.unsqueeze(1) / 2 * (1 + 1e-5)).all())


def test_mse_search_never_worse_than_minmax_on_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen) ** 3
    qmin, qmax = 0, 15
    percentiles = (1.0, 0.9999, 0.999, 0.99, 0.95)
    s_mm, z_mm = Q.search_per_tensor(x, qmin, qmax, False, (1.0,))
    s_se, z_se = Q.search_per_tensor(x, qmin, qmax, False, percentiles, max_elements=1 << 20)
    mse = lambda s, z: float((Q.fake_quant(x, s, z, qmin, qmax) - x).pow(2).mean())  # noqa: E731
    assert mse(s_se, z_se) < 0.5 * mse(s_mm, z_mm)  # clipping the cubic tails pays off at 4 bits


def test_log_sqrt2_hand_values():
    x = torch.tensor([1.0, 2 ** -0.5, 0.5, 0.25, 0.1, 0.0, 1.3])
    codes = Q.log_codes(x, torch.tensor(1.0), bits=3)  # zero code 7
    assert codes.tolist() == [0, 1, 2, 4, 7, 7, 0]
    values = Q.log_sqrt2_dequant(codes, torch.tensor(1.0), bits=3)
    assert values.tolist() == pytest.approx([1.0, 2 ** -0.5, 0.5, 0.25, 0.0, 0.0, 1.0])


def test_log2_multiplier_hand_values():
    assert Q.log2_odd_multiplier(8) == 106  # round(0.41421 * 256)
    codes = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0])
    values = Q.log2_dequant(codes, torch.tensor(1.0), bits=3, frac_bits=8)
    assert values.tolist() == pytest.approx([1.0, (256 + 106) / 256 / 2, 0.5, (256 + 106) / 256 / 4, 0.0])


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("frac_bits", [4, 8, 16])
def test_log2_reparameterization_matches_log_sqrt2(bits, frac_bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.softmax(torch.randn(64, 50, generator=gen) * 3, dim=-1)
    scale = x.max()
    codes = Q.log_codes(x, scale, bits)
    sqrt2 = Q.log_sqrt2_dequant(codes, scale, bits)
    log2 = Q.log2_dequant(codes, scale, bits, frac_bits)
    bound = Q.log2_vs_sqrt2_bound(codes, scale, frac_bits)
    even = (codes % 2 == 0)
    assert torch.equal(sqrt2[even], log2[even])  # even codes are pure shifts: identical
    assert bool(((log2 - sqrt2).abs() <= bound + 1e-7).all())
    # the documented rounding: |sqrt(2) - 1 - M / 2^F| * s * 2^-ceil(q/2) at most
    assert float(bound.max()) <= float(scale) * abs(math.sqrt(2) - 1 - Q.log2_odd_multiplier(frac_bits) / 2 ** frac_bits)


def test_log_scale_search_returns_data_percentile():
    x = torch.softmax(torch.randn(8, 65, 65, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = Q.search_log_scale(x, 4, (1.0, 0.999, 0.99))
    assert 0 < float(scale) <= float(x.max())


def test_consumer_objective_keeps_outliers_that_matter():
    # A few rows carry a large value in channel 0, which the consuming layer weighs heavily:
    # the tensor MSE clips it away, the MSE after the layer keeps it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen)
    x[:10, 0] = 12.0
    weight = torch.full((4, 16), 0.01)
    weight[:, 0] = 1.0
    consumer = lambda t: t @ weight.t()  # noqa: E731
    percentiles = (1.0, 0.999, 0.99, 0.95)
    s_tensor, z_tensor = Q.search_per_tensor(x, 0, 15, False, percentiles, max_elements=1 << 20)
    s_out, z_out = Q.search_per_tensor(x, 0, 15, False, percentiles, sample=x, consumer=consumer)
    assert float(s_out) > 2 * float(s_tensor)
    out_err = lambda s, z: float((consumer(Q.fake_quant(x, s, z, 0, 15)) - consumer(x)).pow(2).mean())  # noqa: E731
    assert out_err(s_out, z_out) < out_err(s_tensor, z_tensor)


def test_exact_extremes_stand_for_percentile_one():
    # the subsample for percentiles may miss the maximum; p = 1 still uses the true one
    x = torch.zeros(1 << 18)
    x[12345] = 100.0
    scale, zp = Q.search_per_tensor(x, 0, 255, False, (1.0,), max_elements=1024)
    assert float(scale) == pytest.approx(100.0 / 255)
    sample = torch.zeros(8, 2)
    sample[:, 1] = torch.linspace(0, 1, 8)
    lo, hi = Q.search_per_channel_range(sample, 0, 255, False, (1.0,),
                                        extremes=(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 5.0])))
    assert lo.tolist() == [-1.0, 0.0] and hi.tolist() == [1.0, 5.0]
