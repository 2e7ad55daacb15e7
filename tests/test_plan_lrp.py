"""LRP on the reference architectures and on timm's DeiT (distilled) and Swin-T: forward values
unchanged, relevance conserved across every residual-stream boundary, deterministic scores."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from edgeq.errors import PlanningError
from edgeq.models.reference import REFERENCE_MODELS
from edgeq.plan import lrp_scores, quantizable_layers, relevance_trace, weight_layers
from edgeq.plan.lrp import lrp_rules

# With timm's initialisation (zero Linear and LayerNorm biases) and a tiny epsilon, the
# conservative rules make every block linear in its input, so the relevance at each block
# boundary equals the target logit up to float32 rounding (measured: below 1e-4 relative).
CONSERVATION_TOLERANCE = 1e-3


def _reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    return REFERENCE_MODELS[name].build().eval()


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["edgeq/vit-cifar10", "edgeq/swin-cifar10"])
def reference(request):
    return request.param, _reference(request.param)


def test_lrp_rules_keep_forward_values(reference):
    _, model = reference
    images = _images(2, 32)
    with torch.no_grad():
        expected = model(images)
    with lrp_rules(model):
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and everything is restored afterwards
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_relevance_is_conserved_at_every_block_boundary(reference):
    name, model = reference
    trace = relevance_trace(model, _images(3, 32), eps=1e-9)
    expected_boundaries = 6 + 1 if "vit" in name else 6 + 2 + 1  # blocks (+ patch merges) + last output
    assert len(trace.boundaries) == expected_boundaries
    for boundary, error in trace.conservation_error().items():
        assert error.max().item() < CONSERVATION_TOLERANCE, boundary
    # relevance starts at the predicted class logit
    with torch.no_grad():
        logits = model(_images(3, 32))
    torch.testing.assert_close(trace.start, logits.max(dim=1).values, rtol=1e-5, atol=1e-6)


def test_with_biases_relevance_plus_bias_share_is_conserved(reference):
    """Biases absorb relevance (the epsilon rule's design): boundary relevance falls short of the
    logit by exactly the relevance the downstream biases take, ``sum(b * d logit / d b)``."""
    name, _ = reference
    model = _reference(name)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    first_block = next(m for n, m in model.named_modules() if n in ("blocks.0", "layers.0.blocks.0"))
    captured = {}
    handle = first_block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith("patch_embed")]
    try:
        with lrp_rules(model, eps=1e-9):
            logit = model(_images(1, 32)).max()
            grads = torch.autograd.grad(logit, [captured["x"]] + [p for _, p in biases], allow_unused=True)
    finally:
        handle.remove()
    boundary = (captured["x"] * grads[0]).sum()
    absorbed = sum((p * g).sum() for (_, p), g in zip(biases, grads[1:]) if g is not None)
    assert abs((boundary / logit).item() - 1) > 10 * CONSERVATION_TOLERANCE  # biases do take a share
    assert (boundary + absorbed).item() == pytest.approx(logit.item(), rel=CONSERVATION_TOLERANCE)


def test_lrp_scores_are_deterministic_and_normalised(reference):
    _, model = reference
    images = _images(4, 32)
    first = lrp_scores(model, images, batch_size=2)
    second = lrp_scores(model, images, batch_size=2)
    assert first == second
    assert sum(first.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v >= 0 for v in first.values())
    expected = [n for n in quantizable_layers(model) if not n.endswith(".matmul_qk")]
    assert list(first) == expected
    assert set(weight_layers(model)) <= set(first)
    without = lrp_scores(model, images, include_matmuls=False)
    assert list(without) == weight_layers(model)


def test_lrp_target_selection():
    model = _reference("edgeq/vit-cifar10")
    images = _images(2, 32)
    with torch.no_grad():
        logits = model(images)
    trace = relevance_trace(model, images, target=3)
    torch.testing.assert_close(trace.start, logits[:, 3])
    trace = relevance_trace(model, images, target=[1, 7])
    torch.testing.assert_close(trace.start, logits[torch.arange(2), torch.tensor([1, 7])])
    with pytest.raises(PlanningError):
        relevance_trace(model, images, target=[1, 2, 3])
    with pytest.raises(PlanningError):
        relevance_trace(model, images, target=10)


@pytest.mark.parametrize(
    "arch, kwargs, size",
    [
        ("deit_tiny_patch16_224", {"img_size": 64}, 64),
        ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
        ("swin_tiny_patch4_window7_224", {}, 224),
    ],
)
def test_timm_architectures(arch, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    trace = relevance_trace(model, _images(1, size), eps=1e-9)
    for boundary, error in trace.conservation_error().items():
        assert error.max().item() < CONSERVATION_TOLERANCE, boundary
    layers = set(trace.layers)
    assert set(weight_layers(model)) <= layers
    if "distilled" in arch:
        assert {"head", "head_dist"} <= layers
        assert trace.layers["head_dist"].item() > 0  # relevance reaches the distillation head too


def test_unsupported_attention_is_refused():
    class FancyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4), FancyAttention(), nn.Linear(4, 3))
    with pytest.raises(PlanningError, match="FancyAttention"):
        relevance_trace(model, torch.randn(1, 3, 4, 4))
