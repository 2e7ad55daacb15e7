"""Nuclear-norm scores (Liu et al. 2021) and the attention ranking loss."""
from __future__ import annotations

import pytest
import torch

from edgeq.errors import PlanningError
from edgeq.models.reference import REFERENCE_MODELS
from edgeq.plan import attention_modules, attention_ranking_loss, nuclear_scores, quantizable_layers
from edgeq.plan.nuclear import nuclear_norm


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["edgeq/vit-cifar10", "edgeq/swin-cifar10"])
def model(request):
    torch.manual_seed(0)
    return REFERENCE_MODELS[request.param].build().eval()


def test_nuclear_scores_cover_every_layer_and_are_deterministic(model):
    images = _images(3)
    first = nuclear_scores(model, images)
    second = nuclear_scores(model, images)
    assert first == second
    assert list(first) == quantizable_layers(model)
    assert sum(first.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v > 0 for v in first.values())
    # batching does not change the result beyond rounding
    batched = nuclear_scores(model, images, batch_size=2)
    assert batched == pytest.approx(first, rel=1e-6)


def test_msa_layers_share_their_attention_map_norm(model):
    scores = nuclear_scores(model, _images(2), normalize=False)
    for attn in attention_modules(model):
        values = [scores[f"{attn}.{child}"] for child in ("qkv", "proj", "matmul_qk", "matmul_av")]
        assert values == pytest.approx([values[0]] * 4)
        tokens = 65 if "blocks" in attn and not attn.startswith("layers") else 16
        assert 1.0 - 1e-6 <= values[0] <= tokens  # a row-stochastic map's nuclear norm lies in [1, tokens]
    output = nuclear_scores(model, _images(2), normalize=False, msa_source="output")
    first = next(iter(attention_modules(model)))
    assert output[f"{first}.qkv"] != pytest.approx(scores[f"{first}.qkv"])


def test_head_score_is_the_logit_norm():
    torch.manual_seed(0)
    model = REFERENCE_MODELS["edgeq/vit-cifar10"].build().eval()
    images = _images(3)
    with torch.no_grad():
        logits = model(images)
    scores = nuclear_scores(model, images, normalize=False, include_matmuls=False)
    assert scores["head"] == pytest.approx(logits.double().norm(dim=1).mean().item(), rel=1e-6)
    assert not any("matmul" in name for name in scores)


def test_nuclear_norm_matches_torch():
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (7, 5), (3, 4, 9)]:
        m = torch.randn(*shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(nuclear_norm(m), torch.linalg.matrix_norm(m, ord="nuc"))


def test_bad_arguments():
    torch.manual_seed(0)
    model = REFERENCE_MODELS["edgeq/vit-cifar10"].build().eval()
    with pytest.raises(PlanningError):
        nuclear_scores(model, _images(1), msa_source="values")
    with pytest.raises(PlanningError):
        nuclear_scores(model, torch.randn(3, 32, 32))


# ----------------------------------------------------------------------------- ranking loss


def test_ranking_loss_hand_example():
    float_attn = torch.tensor([0.5, 0.3, 0.2])
    quant_attn = torch.tensor([0.2, 0.3, 0.5])  # order fully reversed
    # pairs (0,1), (0,2), (1,2): float order +1 each; quantized gaps -0.1, -0.3, -0.2
    # hinge(0.1 - gap): 0.2 + 0.4 + 0.3
    assert attention_ranking_loss(float_attn, quant_attn, margin=0.1).item() == pytest.approx(0.9)
    assert attention_ranking_loss(float_attn, quant_attn, margin=0.1, reduction="mean").item() == pytest.approx(0.3)
    # same order with every gap at least the margin: no loss
    assert attention_ranking_loss(float_attn, float_attn, margin=0.1).item() == pytest.approx(0.0)
    # same order but one gap (0.3 vs 0.2 -> 0.1) smaller than a margin of 0.15: penalised by 0.05
    assert attention_ranking_loss(float_attn, float_attn, margin=0.15).item() == pytest.approx(0.05)


def test_ranking_loss_rows_ties_and_gradient():
    float_attn = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]])  # (batch, rows, keys)
    quant_attn = torch.tensor([[[0.1, 0.9, 0.0], [0.2, 0.1, 0.7]]], requires_grad=True)
    loss = attention_ranking_loss(float_attn, quant_attn, margin=0.0)
    # row 0: tie (0,1) skipped; (0,2): +1, gap 0.1 -> 0; (1,2): +1, gap 0.9 -> 0
    # row 1: (0,1): -1, gap 0.1 -> hinge(0 + 0.1) = 0.1; (0,2): -1, gap -0.5 -> 0; (1,2): -1, gap -0.6 -> 0
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    expected = torch.zeros_like(quant_attn)
    expected[0, 1, 0], expected[0, 1, 1] = 1.0, -1.0  # d/dq (q0 - q1) for the one active pair
    torch.testing.assert_close(quant_attn.grad, expected)
    with pytest.raises(ValueError):
        attention_ranking_loss(float_attn, quant_attn[..., :2])
