"""Block reconstruction (``edgeq.quant.reconstruct``) on a tiny seeded ViT: error, rounding, lowering, cache, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import edgeq.quant.api as api
import edgeq.quant.reconstruct as R
from edgeq.errors import CalibrationError
from edgeq.quant import quantize
from edgeq.quant.modules import QuantConv2d, QuantLinear, UniformQuantizer
from edgeq.quant.reconstruct import MIN_RECONSTRUCTION_IMAGES, ReconstructionConfig, unit_output_errors
from cli_runner import run_cli
from test_lower_integer_model import agrees, compiled_against_fake_quant

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(depth=1, embed_dim=48, num_heads=2)
QUICK = ReconstructionConfig(iters=40, batch_size=8)


@pytest.fixture(scope="module")
def tiny_vit(build):
    return build("edgeq/vit-cifar10", **TINY)


@pytest.fixture(scope="module")
def images():
    return torch.randn(MIN_RECONSTRUCTION_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def calibrated(tiny_vit, images):
    return quantize(tiny_vit, images, "w4a4", method="repq")


@pytest.fixture(scope="module")
def reconstructed(tiny_vit, images):
    return quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=QUICK, cache=False)


def _weighted(qmodel):
    return {name: m for name, m in qmodel.layers.items() if isinstance(m, (QuantLinear, QuantConv2d))}


def test_every_unit_output_is_closer_to_float_than_the_calibrated_start(tiny_vit, images, calibrated, reconstructed):
    before = unit_output_errors(tiny_vit, calibrated, images)
    after = unit_output_errors(tiny_vit, reconstructed, images)
    assert list(before) == ["patch_embed", "blocks.0", "head"]
    for unit in before:
        assert after[unit] <= before[unit], (unit, before[unit], after[unit])
    # the 4-bit patch embedding of random weights on random images gains nothing in 40 iterations here;
    # the transformer block and the head must
    for unit in ("blocks.0", "head"):
        assert after[unit] < 0.97 * before[unit], (unit, before[unit], after[unit])
    records = reconstructed.metadata["reconstruction"]["units"]
    assert [r["unit"] for r in records] == list(before)
    assert all(r["final_error"] < r["start_error"] for r in records if r["kept"])


def test_hard_weights_are_within_one_step_of_round_to_nearest(calibrated, reconstructed):
    changed = 0
    for name, start in _weighted(calibrated).items():
        learned = _weighted(reconstructed)[name]
        assert torch.equal(learned.weight_scale, start.weight_scale)
        assert torch.equal(learned.weight_zero_point, start.weight_zero_point)
        assert learned.weight_int.dtype == torch.int8
        assert int(learned.weight_int.min()) >= learned.w_qmin and int(learned.weight_int.max()) <= learned.w_qmax
        step = (learned.weight_int.int() - start.weight_int.int()).abs()  # calibration rounds to nearest
        assert int(step.max()) <= 1, name
        changed += int(step.sum())
    assert changed > 0  # the rounding really was learned


def test_activation_steps_are_learned_and_zero_points_kept(calibrated, reconstructed):
    starts = {n: m for n, m in calibrated.model.named_modules() if isinstance(m, UniformQuantizer)}
    learned = {n: m for n, m in reconstructed.model.named_modules() if isinstance(m, UniformQuantizer)}
    assert starts.keys() == learned.keys()
    assert all(torch.equal(learned[n].zero_point, starts[n].zero_point) for n in starts)
    assert any(not torch.equal(learned[n].scale, starts[n].scale) for n in starts)
    # no learning state is left behind in the modules or the state dict
    assert "forward" not in vars(next(iter(learned.values())))
    assert reconstructed.model.state_dict().keys() == calibrated.model.state_dict().keys()


def test_reconstructed_model_lowers_to_an_integer_program_that_agrees(reconstructed, tmp_path_factory):
    _, _, expected, got = compiled_against_fake_quant(reconstructed, tmp_path_factory)
    agrees(expected, got, rel=0.05)


def test_cache_hit_is_the_same_model_without_recomputing(tiny_vit, images, monkeypatch):
    first = quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=QUICK)
    entries = list((Path(R.cache_path({}).parent)).glob("*.safetensors"))
    assert len(entries) == 1

    def refuse(*_args, **_kwargs):
        raise AssertionError("reconstruction ran although the result was cached")

    monkeypatch.setattr(api, "reconstruct", refuse)
    again = quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=QUICK)
    for key, tensor in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(again(images), first(images))
    # other options are another entry: computed, not read
    with pytest.raises(AssertionError, match="although the result was cached"):
        quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=ReconstructionConfig(iters=41, batch_size=8))


def test_interrupted_reconstruction_leaves_no_cache_entry(tiny_vit, images):
    seen = []

    def interrupt(done, total, what):
        seen.append(what)
        if what == "blocks.0":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=QUICK, progress=interrupt)
    assert "blocks.0" in seen
    folder = R.cache_path({}).parent
    assert not folder.exists() or not any(folder.iterdir())


def test_too_few_images_names_the_minimum(tiny_vit, images):
    with pytest.raises(CalibrationError, match=f"at least {MIN_RECONSTRUCTION_IMAGES} calibration images, got 8"):
        quantize(tiny_vit, images[:8], "w4a4", reconstruction=QUICK, cache=False)


def test_non_finite_loss_stops_with_one_line(tiny_vit, images, monkeypatch):
    monkeypatch.setattr(R, "output_error", lambda out, target: (out - target).sum() * float("nan"))
    with pytest.raises(CalibrationError) as info:
        quantize(tiny_vit, images, "w4a4", reconstruction=QUICK, cache=False)
    assert "non-finite at iteration 0" in str(info.value) and "\n" not in str(info.value)


def test_cli_too_few_images_exits_21_and_writes_nothing(capsys, tiny_folder, tmp_path):
    out = tmp_path / "q.safetensors"
    code, _, err = run_cli(capsys, "quantize", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                           str(tiny_folder), "--calib-count", "8", "--bits", "w4a4", "--reconstruct", "adaround",
                           "--out", str(out))
    assert code == 21 and f"at least {MIN_RECONSTRUCTION_IMAGES} calibration images" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_auto_reconstructs_only_plans_with_4_bits_or_fewer():
    from edgeq.bitplan import BitPlan

    assert R.resolve_reconstruction("auto", BitPlan.from_spec("w8a8")) is None
    assert R.resolve_reconstruction("auto", BitPlan.from_spec("w4a8"), iters=7).iters == 7
    assert R.resolve_reconstruction("none", BitPlan.from_spec("w3a3")) is None


@pytest.fixture(scope="module")
def gptq_rounded(tiny_vit, images):
    return quantize(tiny_vit, images, "w4a4", method="repq", reconstruction=ReconstructionConfig(method="gptq"),
                    cache=False)


def test_gptq_codes_minimize_the_hessian_weighted_error_better_than_nearest():
    """On correlated inputs, GPTQ's column-by-column rounding beats rounding to nearest on ||(W - Q) X||."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=gen)
    x = torch.randn(512, 16, generator=gen) @ mix          # correlated input columns
    w = torch.randn(8, 16, generator=gen)
    scale, zero = w.abs().amax(1) / 7, torch.zeros(8)
    nearest = torch.clamp(torch.round(w / scale[:, None]), -8, 7)
    codes = R.gptq_codes(w, x.T.double() @ x.double(), scale, zero, -8, 7)
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7

    def error(c):
        return float(((w - c * scale[:, None]) @ x.T).pow(2).sum())

    assert error(codes) < 0.8 * error(nearest)


def test_gptq_lowers_unit_errors_and_keeps_the_integer_format(tiny_vit, images, calibrated, gptq_rounded):
    before = unit_output_errors(tiny_vit, calibrated, images)
    after = unit_output_errors(tiny_vit, gptq_rounded, images)
    for unit in before:
        assert after[unit] <= before[unit], (unit, before[unit], after[unit])
    assert after["blocks.0"] < before["blocks.0"] and after["head"] < before["head"], (before, after)
    records = gptq_rounded.metadata["reconstruction"]["units"]
    assert records[0]["unit"] == "patch_embed" and any(r["kept"] and r["weights_changed"] for r in records)
    for name, layer in _weighted(gptq_rounded).items():
        start = _weighted(calibrated)[name]
        assert torch.equal(layer.weight_scale, start.weight_scale)   # same grid: scales and zero points kept
        assert torch.equal(layer.weight_zero_point, start.weight_zero_point)
        assert layer.weight_int.min() >= layer.w_qmin and layer.weight_int.max() <= layer.w_qmax


def test_gptq_model_lowers_to_an_integer_program_that_agrees(gptq_rounded, tmp_path_factory):
    """The kernels get exactly the GPTQ codes, and the compiled program computes what fake-quant computes. A tiny
    random W4A4 model sits at its noise floor (one 4-bit activation code flipped by a float rounding difference
    in LayerNorm or GELU moves its logits by several %: the RTN model does so on 5 of 40 random images), so most
    images, not all, must agree to float precision."""
    import numpy as np

    from edgeq.lower.integer import kernel_constants
    from edgeq.lower.kernels.qlinear import qlinear_kernel

    _, mod, expected, got = compiled_against_fake_quant(gptq_rounded, tmp_path_factory)
    constants = kernel_constants(mod)
    for name, layer in _weighted(gptq_rounded).items():
        codes = layer.weight_int.reshape(layer.weight_int.shape[0], -1).numpy()
        kernel = qlinear_kernel(1, codes.shape[1], codes.shape[0], "host", x_dtype="uint8", w_bits=4, out_dtype="int32")
        assert np.array_equal(kernel.pack(codes)["w"], constants[f"{name}.weight"]), name
    rel = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert (rel < 1e-5).sum() >= 4, rel
