"""Scale reparameterization: folding channel-wise post-LayerNorm quantization is exact; LRP-QViT clipping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgeq.quant import QuantConfig
from edgeq.quant import quantizers as Q
from edgeq.quant import reparam as R
from edgeq.quant.modules import Calibration, LayerSpec, QuantLinear

pytestmark = pytest.mark.usefixtures("single_thread")

C, OUT, BITS = 32, 20, 4
QMIN, QMAX = 0, 2 ** BITS - 1


def _layernorm_and_linear(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(C).to(dtype)
    linear = torch.nn.Linear(C, OUT).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(C, generator=gen))
        norm.bias.copy_(0.5 * torch.randn(C, generator=gen))
        norm.weight[3] = 12.0   # outlier channels: wide range, far offset
        norm.bias[7] = 25.0
        linear.weight.copy_(torch.randn(OUT, C, generator=gen) / C ** 0.5)
        linear.bias.copy_(torch.randn(OUT, generator=gen))
    x = torch.randn(6, 50, C, generator=gen, dtype=dtype) * 2 + 1
    for p in (*norm.parameters(), *linear.parameters()):
        p.requires_grad_(False)
    return norm, linear, x


def _fold_for(y):
    lo, hi = y.reshape(-1, C).aminmax(dim=0)
    scale, zp = R.channel_params(lo, hi, QMIN, QMAX, symmetric=False)
    return R.make_fold(scale, zp, QMIN, QMAX)


def test_fold_is_exact_in_float():
    norm, linear, x = _layernorm_and_linear()
    y = norm(x)
    fold = _fold_for(y)
    folded_norm, folded_linear = copy.deepcopy(norm), copy.deepcopy(linear)
    R.fold_layernorm_(folded_norm, fold)
    w, b = R.fold_linear(linear.weight.detach(), linear.bias.detach(), fold)
    with torch.no_grad():
        folded_linear.weight.copy_(w)
        folded_linear.bias.copy_(b)
        # without any quantization the folded pair computes the same function
        assert torch.allclose(folded_linear(folded_norm(x)), linear(y), atol=1e-10)
        y_folded = folded_norm(x)
    assert torch.allclose(y_folded, R.fold_activation(y, fold), atol=1e-10)

    # layer-wise codes of the folded output are the channel-wise codes of the original, code for code
    channel_codes = Q.quantize(y, fold.scale, fold.zero_point, QMIN, QMAX)
    layer_codes = Q.quantize(y_folded, fold.layer_scale, fold.layer_zero_point, QMIN, QMAX)
    assert torch.equal(layer_codes, channel_codes)
    assert bool((fold.r2 == fold.r2.round()).all())  # the zero-point shift is an integer

    # and the reparameterized LN + Linear on layer-wise quantization equals channel-wise quantization
    channel_out = linear(Q.fake_quant(y, fold.scale, fold.zero_point, QMIN, QMAX))
    layer_out = folded_linear(Q.fake_quant(y_folded, fold.layer_scale, fold.layer_zero_point, QMIN, QMAX))
    assert torch.allclose(layer_out, channel_out, atol=1e-9)
    assert QMIN <= float(fold.layer_zero_point) <= QMAX


def test_fold_in_float32_within_1e5():
    norm, linear, x = _layernorm_and_linear(torch.float32)
    y = norm(x)
    fold = _fold_for(y)
    folded_norm = copy.deepcopy(norm)
    R.fold_layernorm_(folded_norm, fold)
    w, b = R.fold_linear_double(linear.weight.detach(), linear.bias.detach(), fold)
    with torch.no_grad():
        assert torch.allclose(F.linear(folded_norm(x), w, b), linear(y), atol=1e-5, rtol=1e-5)


def test_clip_ranges_rule():
    lo = torch.tensor([-1.0, -1.0, 0.0, 5.0])
    hi = torch.tensor([1.0, 1.0, 2.0, 25.0])
    clo, chi = R.clip_ranges(lo, hi, kappa=4.0)     # median width 2 -> cap 8, about the centre 15
    assert clo.tolist() == [-1.0, -1.0, 0.0, 11.0]
    assert chi.tolist() == [1.0, 1.0, 2.0, 19.0]
    assert R.clip_ranges(lo, hi, None) == (lo, hi)


def _calibrated(method: str, norm, linear, x, **options):
    norm = copy.deepcopy(norm)
    config = QuantConfig.for_method(method, **options)
    calibration = Calibration(config=config, total=1)
    spec = LayerSpec(name="fc", kind="linear", w_bits=BITS, a_bits=BITS, norm="norm")
    layer = QuantLinear.from_float(linear, spec, calibration, norm)
    with torch.no_grad():
        first = layer(norm(x))      # calibrates, folding into ``norm``
        again = layer(norm(x))      # the folded LayerNorm now feeds the layer directly
    return norm, layer, first, again, calibration.records["fc"]


@pytest.mark.parametrize("method", ["repq", "lrp-qvit"])
def test_quantlinear_folds_into_its_layernorm(method):
    norm, linear, x = _layernorm_and_linear(torch.float32)
    folded, layer, first, again, record = _calibrated(method, norm, linear, x)
    assert not torch.allclose(folded.weight, norm.weight)             # the affine was rewritten
    assert torch.allclose(first, again, atol=1e-4)                     # same function before and after the fold
    with torch.no_grad():
        ref = linear(norm(x))
    assert float((again - ref).pow(2).mean()) < 0.1 * float(ref.pow(2).mean())
    assert record["r1_max_over_median"] >= 1.0
    if method == "repq":
        assert record["clip_kappa"] is None


def test_lrp_clipping_is_chosen_by_output_error():
    norm, linear, x = _layernorm_and_linear(torch.float32)
    with torch.no_grad():
        norm.weight[10:14] = 6.0  # a group of wide channels: clipping them spares the folded weights
    ref = linear(norm(x)).detach()
    _, _, _, repq_out, repq_rec = _calibrated("repq", norm, linear, x)
    _, _, _, lrp_out, lrp_rec = _calibrated("lrp-qvit", norm, linear, x)
    assert repq_rec["clip_kappa"] is None
    assert lrp_rec["clip_kappa"] is not None and lrp_rec["r1_max_over_median"] <= lrp_rec["clip_kappa"] + 1e-4
    # (measured: about 0.79 of RepQ-ViT's output MSE on this layer)
    assert float((lrp_out - ref).pow(2).mean()) < 0.9 * float((repq_out - ref).pow(2).mean())
