"""No calibration data: synthetic images from the model, with a warning and a metadata record."""
from __future__ import annotations

import pytest
import torch

from edgeq.quant import SyntheticCalibrationWarning, quantize
from edgeq.quant.synthetic import synthesize_calibration

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = dict(synthetic_images=8, synthetic_steps=3)


def test_synthetic_calibration_warns_and_is_recorded(vit_model, test_images):
    with pytest.warns(SyntheticCalibrationWarning, match="no calibration data"):
        qmodel = quantize(vit_model, None, "w8a8", method="repq", **FAST)
    assert qmodel.metadata["calibration"] == "synthetic"
    assert qmodel.metadata["calibration_images"] == 8
    with torch.no_grad():
        out, ref = qmodel(test_images), vit_model(test_images)
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.5


def test_synthetic_images_are_deterministic_and_in_range(swin_model):
    flags = [p.requires_grad for p in swin_model.parameters()]
    a = synthesize_calibration(swin_model, (3, 32, 32), count=4, steps=2, seed=5)
    b = synthesize_calibration(swin_model, (3, 32, 32), count=4, steps=2, seed=5)
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    mean = torch.tensor(swin_model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(swin_model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert bool((a >= (0 - mean) / std - 1e-6).all()) and bool((a <= (1 - mean) / std + 1e-6).all())
    assert [p.requires_grad for p in swin_model.parameters()] == flags  # the model is given back as it was
    assert not swin_model.training


def test_optimisation_raises_patch_similarity_entropy(vit_model):
    from edgeq.quant.synthetic import _similarity_entropy

    def entropy(images):
        captured = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: captured.append(o)) for b in vit_model.blocks]
        with torch.no_grad():
            vit_model(images)
        for h in hooks:
            h.remove()
        gen = torch.Generator().manual_seed(0)
        return sum(float(_similarity_entropy(o[:, 1:], gen)) for o in captured)

    start = synthesize_calibration(vit_model, (3, 32, 32), count=4, steps=0, seed=0)
    tuned = synthesize_calibration(vit_model, (3, 32, 32), count=4, steps=15, seed=0)
    assert entropy(tuned) > entropy(start)


def test_progress_covers_synthesis_and_calibration(vit_model):
    calls = []
    with pytest.warns(SyntheticCalibrationWarning):
        quantize(vit_model, None, "w8a8", method="minmax", progress=lambda *a: calls.append(a), **FAST)
    totals = {c[1] for c in calls}
    assert len(totals) == 1 and calls[-1][0] == calls[-1][1]
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    assert calls[0][2] == "synthetic calibration images"
