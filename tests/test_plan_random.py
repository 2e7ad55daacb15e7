"""The random-plan control: seeded, and always within the budget it is given."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from edgeq.bitplan import BitPlan, LayerBits
from edgeq.models.reference import REFERENCE_MODELS
from edgeq.plan import LatencyTable, layer_costs, make_plan, parse_budgets, plan_metrics, plot_plan, random_plan


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return REFERENCE_MODELS["edgeq/vit-cifar10"].build().eval()


@pytest.fixture(scope="module")
def costs(vit):
    return layer_costs(vit)


def _latency(costs) -> LatencyTable:
    """A synthetic table: time proportional to MACs * (w + a), with a fixed per-layer overhead."""
    layers = {}
    for name, cost in costs.items():
        widths = [(a, a) for a in (4, 6, 8)] if not cost.has_weight else [(w, a) for w in (2, 3, 4, 6, 8) for a in (4, 6, 8)]
        layers[name] = {wa: 0.01 + cost.macs * (wa[0] + wa[1]) * 1e-9 for wa in widths}
    return LatencyTable(model="edgeq/vit-cifar10", target="synthetic", layers=layers, base_ms=0.5)


@pytest.mark.parametrize("budget", ["avg-bits=3.3", "weight-bytes=1.1MB", "bops=3G", "latency-ms=2", "avg-bits=5,bops=4G"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_plan_meets_the_budget(costs, budget, seed):
    table = _latency(costs)
    plan = random_plan(costs, budget, seed=seed, latency=table, model_name="edgeq/vit-cifar10")
    assert set(plan.layers) == set(costs)
    metrics = plan_metrics(plan, costs, table)
    budgets = parse_budgets(budget)
    for part in budgets:
        assert metrics[part.kind] <= part.limit * (1 + 1e-6)
    # a control that spends its budget, like the planners do
    assert any(metrics[part.kind] >= 0.9 * part.limit for part in budgets)
    assert plan.provenance["method"] == "random" and plan.provenance["seed"] == seed


def test_random_plan_is_seeded(costs):
    first = random_plan(costs, "avg-bits=4", seed=7)
    assert random_plan(costs, "avg-bits=4", seed=7).layers == first.layers
    others = [random_plan(costs, "avg-bits=4", seed=s).layers for s in range(8, 11)]
    assert any(layers != first.layers for layers in others)


def test_shuffled_scores_keep_their_values(costs):
    scores = {name: float(i + 1) for i, name in enumerate(costs)}
    plan = random_plan(costs, "avg-bits=4", seed=3, scores=scores)
    used = plan.provenance["scores"]
    assert sorted(used.values()) == pytest.approx(sorted(v / sum(scores.values()) for v in scores.values()), rel=1e-5)
    assert plan.provenance["random_scores"] == "shuffled"


def test_make_plan_methods_on_the_reference_vit(vit, tmp_path):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for method in ("lrp", "nuclear", "random"):
        plan, scores = make_plan(vit, method, "avg-bits=4", images, model_name="edgeq/vit-cifar10")
        assert plan.provenance["method"] == method
        assert plan.provenance["achieved"]["avg-bits"] <= 4 + 1e-6
        assert scores
    png = plot_plan(scores, plan, tmp_path / "plots" / "plan.png")
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.width > 800 and image.height > 600


def test_plot_plan_with_unscored_and_default_layers(tmp_path):
    plan = BitPlan(LayerBits(8, 8), {"a": LayerBits(2, 8), "b": LayerBits(4, 6), "x.matmul_qk": LayerBits(6, 6)},
                   {"method": "manual"})
    png = plot_plan({"a": 0.7, "b": 0.3, "c": 0.0}, plan, tmp_path / "p.png", title="hand plan")
    assert png.stat().st_size > 1000


def test_plot_uses_a_log_axis_when_scores_span_decades(tmp_path):
    from edgeq.bitplan import BitPlan
    from edgeq.plan.plot import spans_decades

    assert spans_decades([1e-4, 0.5, 30.0]) and not spans_decades([0.2, 0.9, 3.0])
    assert not spans_decades([-1.0, 1e-4, 30.0]) and not spans_decades([0.0, 5.0])
    png = plot_plan({"a": 1e-5, "b": 0.3, "c": 40.0, "d": 0.0}, BitPlan.uniform(8, 8), tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
