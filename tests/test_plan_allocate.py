"""ILP bit allocation: known optima on hand-made problems, every budget kind, infeasibility
messages, budget strings, latency tables, and layer costs of the reference models."""
from __future__ import annotations

import itertools

import pytest
import torch

from edgeq.bitplan import BitPlan, LayerBits, read_plan, write_plan
from edgeq.errors import BudgetInfeasibleError, PlanningError
from edgeq.models.reference import REFERENCE_MODELS
from edgeq.plan import (
    LatencyTable,
    LayerCost,
    allocate,
    format_budget,
    layer_costs,
    make_plan,
    parse_budget,
    parse_budgets,
    plan_metrics,
)

# Three weight layers and one attention matmul.
COSTS = {
    "a": LayerCost(params=100, macs=1000, out_channels=10),
    "b": LayerCost(params=100, macs=1000, out_channels=10),
    "c": LayerCost(params=200, macs=4000, out_channels=20),
    "attn.matmul_qk": LayerCost(params=0, macs=500, kind="matmul"),
}
WEIGHT_ONLY = {k: v for k, v in COSTS.items() if v.has_weight}


def _latency_table(model="toy", target="board", base=1.0) -> dict:
    return {
        "header": {"version": 1, "model": model, "target": target, "unit": "ms", "base_ms": base},
        "layers": {
            "a": {"w8a8": 1.0, "w4a8": 0.6, "w2a8": 0.5, "w8a4": 0.8, "w4a4": 0.4, "w2a4": 0.3},
            "b": {"w8a8": 1.0, "w4a8": 0.6, "w2a8": 0.5, "w8a4": 0.8, "w4a4": 0.4, "w2a4": 0.3},
            "c": {"w8a8": 2.0, "w4a8": 1.2, "w2a8": 1.0, "w8a4": 1.6, "w4a4": 0.8, "w2a4": 0.6},
            "attn.matmul_qk": {"a8": 0.5, "a4": 0.3},
        },
    }


# ----------------------------------------------------------------------------- brute force reference


def _choices(cost, w_bits, a_bits):
    return [(w, a) for w in w_bits for a in a_bits] if cost.has_weight else [(a, a) for a in a_bits]


def _value(kind, costs, choice, table=None):
    """Budget quantities written out independently of edgeq.plan.allocate."""
    if kind == "avg-bits":
        weighted = [(c.params, choice[n][0]) for n, c in costs.items() if c.has_weight]
        return sum(p * w for p, w in weighted) / sum(p for p, _ in weighted)
    if kind == "weight-bytes":
        return sum(c.params * choice[n][0] / 8 + 4 * c.out_channels for n, c in costs.items() if c.has_weight)
    if kind == "bops":
        return sum(c.macs * choice[n][0] * choice[n][1] for n, c in costs.items())
    if kind == "latency-ms":
        layers = table["layers"]
        key = lambda n, w, a: f"a{a}" if n.endswith("matmul_qk") else f"w{w}a{a}"
        return table["header"]["base_ms"] + sum(layers[n][key(n, *choice[n])] for n in costs)
    raise AssertionError(kind)


def _brute_force(costs, objective, budgets, w_bits, a_bits, table=None):
    names = list(costs)
    best = None
    for combo in itertools.product(*(_choices(costs[n], w_bits, a_bits) for n in names)):
        choice = dict(zip(names, combo))
        if all(_value(kind, costs, choice, table) <= limit + 1e-9 for kind, limit in budgets):
            value = sum(objective(n, *choice[n]) for n in names)
            if best is None or value < best[0] - 1e-12:
                best = (value, choice)
    return best


def _plan_choice(plan: BitPlan) -> dict:
    return {name: (bits.w, bits.a) for name, bits in plan.layers.items()}


# ----------------------------------------------------------------------------- known optima


def test_hand_made_problem_linear_benefit():
    # maximise 10*w_a + 1*w_b + 1*w_c with 100*w_a + 100*w_b + 200*w_c <= 4 * 400:
    # everything starts at 2 bits (800); a to 8 gains 60 for 600, b to 4 gains 2 for the last 200.
    plan = allocate(WEIGHT_ONLY, "avg-bits=4", scores={"a": 10, "b": 1, "c": 1},
                    w_bits=(2, 4, 8), a_bits=(8,), benefit="linear")
    assert _plan_choice(plan) == {"a": (8, 8), "b": (4, 8), "c": (2, 8)}
    assert plan.provenance["achieved"]["avg-bits"] == pytest.approx(4.0)
    assert plan.provenance["method"] == "ilp" and plan.provenance["budget"] == ["avg-bits=4"]
    assert plan.provenance["scores"] == {"a": 10, "b": 1, "c": 1}


def test_hand_made_problem_damage_table():
    damage = {"a": {2: 10, 4: 1, 8: 0}, "b": {2: 3, 4: 1, 8: 0.5}, "c": {2: 2, 4: 1.5, 8: 0}}
    # 800 bytes of headroom over all-2-bit: a8+b4 (damage 0+1+2 = 3) beats a4+b8 and a4+b4+c4 (3.5)
    plan = allocate(WEIGHT_ONLY, "avg-bits=4", damage=damage, w_bits=(2, 4, 8), a_bits=(4, 8))
    assert _plan_choice(plan) == {"a": (8, 8), "b": (4, 8), "c": (2, 8)}  # w-only tables keep a at 8
    assert plan.provenance["objective"] == "damage"
    # (w, a) keys in any spelling
    damage_wa = {"a": {(8, 8): 0, "w2a8": 5, LayerBits(2, 4): 6}, "b": {"w8a8": 1, "w2a4": 0}, "c": {"8": 0}}
    plan = allocate(WEIGHT_ONLY, "avg-bits=8", damage=damage_wa, w_bits=(2, 8), a_bits=(4, 8))
    assert _plan_choice(plan) == {"a": (8, 8), "b": (2, 4), "c": (8, 8)}


def test_noise_benefit_spreads_bits():
    # equal scores and sizes: the concave noise benefit gives everyone the same width
    costs = {name: LayerCost(100, 1000, 10) for name in "abcd"}
    plan = allocate(costs, "avg-bits=4", scores=dict.fromkeys("abcd", 1.0), a_bits=(8,))
    assert {bits.w for bits in plan.layers.values()} == {4}


@pytest.mark.parametrize(
    "budgets",
    [
        [("avg-bits", 3.5)],
        [("weight-bytes", 290.0)],
        [("bops", 150_000.0)],
        [("latency-ms", 3.9)],
        [("avg-bits", 5.0), ("bops", 200_000.0)],
        [("weight-bytes", 330.0), ("latency-ms", 4.2)],
    ],
)
@pytest.mark.parametrize("benefit", ["noise", "linear"])
def test_each_budget_kind_matches_brute_force(budgets, benefit):
    scores = {"a": 3.0, "b": 1.0, "c": 0.5, "attn.matmul_qk": 2.0}
    w_bits, a_bits = (2, 4, 8), (4, 8)
    gain = (lambda b: -(4.0 ** (2 - b))) if benefit == "noise" else float

    def objective(name, w, a):
        return -scores[name] * ((gain(w) if COSTS[name].has_weight else 0.0) + gain(a))

    table = _latency_table()
    spec = ",".join(f"{kind}={limit}" for kind, limit in budgets)
    plan = allocate(COSTS, spec, scores=scores, w_bits=w_bits, a_bits=a_bits, benefit=benefit,
                    latency=table, model_name="toy", target="board")
    best_value, _ = _brute_force(COSTS, objective, budgets, w_bits, a_bits, table)
    choice = _plan_choice(plan)
    assert sum(objective(n, *choice[n]) for n in COSTS) == pytest.approx(best_value, rel=1e-9, abs=1e-12)
    for kind, limit in budgets:
        assert _value(kind, COSTS, choice, table) <= limit * (1 + 1e-9)
        assert plan.provenance["achieved"][kind] == pytest.approx(_value(kind, COSTS, choice, table), rel=1e-5)
    metrics = plan_metrics(plan, COSTS, LatencyTable.from_json(table))
    for kind in ("avg-bits", "weight-bytes", "bops", "latency-ms"):
        assert metrics[kind] == pytest.approx(_value(kind, COSTS, choice, table))


def test_unscored_layers_are_held_at_the_top_and_charged():
    plan = allocate(COSTS, "bops=100K", scores={"a": 1.0, "b": 1.0, "c": 1.0}, w_bits=(2, 4, 8), a_bits=(4, 8))
    assert plan.layers["attn.matmul_qk"] == LayerBits(8, 8)
    assert plan.provenance["held_at_max"] == ["attn.matmul_qk"]
    assert plan.provenance["achieved"]["bops"] <= 100_000
    assert plan.default == LayerBits(8, 8)


def test_plan_round_trips_through_a_file(tmp_path):
    plan = allocate(WEIGHT_ONLY, "avg-bits=4", scores={"a": 3, "b": 2, "c": 1}, method="lrp",
                    provenance={"model": "toy"})
    again = read_plan(write_plan(plan, tmp_path / "plan.json"))
    assert again.layers == plan.layers
    assert again.provenance["method"] == "lrp" and again.provenance["model"] == "toy"
    assert again.provenance["scores"] == {"a": 3, "b": 2, "c": 1}


# ----------------------------------------------------------------------------- infeasible budgets


@pytest.mark.parametrize(
    "budget, minimum",
    [
        ("avg-bits=1.5", "avg-bits=2"),  # every weight layer at 2 bits
        ("weight-bytes=259B", "weight-bytes=260B"),  # 400 params * 2 / 8 + 40 channels * 4
        ("weight-bytes=0.1KiB", "weight-bytes=260B"),
        ("bops=50K", "bops=56K"),  # (1000 + 1000 + 4000) * 2 * 4 + 500 * 4 * 4
        ("latency-ms=2", "latency-ms=2.5"),  # base 1 + 0.3 + 0.3 + 0.6 + 0.3 (measured fastest)
    ],
)
def test_infeasible_budget_names_the_minimum(budget, minimum):
    with pytest.raises(BudgetInfeasibleError, match=rf"smallest feasible is {minimum}\b") as info:
        allocate(COSTS, budget, scores=dict.fromkeys(COSTS, 1.0), w_bits=(2, 4, 8), a_bits=(4, 8),
                 latency=_latency_table())
    assert info.value.exit_code == 31
    # and the named minimum is itself feasible
    allocate(COSTS, minimum, scores=dict.fromkeys(COSTS, 1.0), w_bits=(2, 4, 8), a_bits=(4, 8),
             latency=_latency_table())


def test_minimum_is_rounded_up_to_stay_feasible():
    costs = {"x": LayerCost(params=1001, macs=10, out_channels=0), "y": LayerCost(params=2000, macs=10)}
    # minimum avg-bits with x at 3 bits and y at 2: (3003 + 4000) / 3001 = 2.33355...
    with pytest.raises(BudgetInfeasibleError, match=r"avg-bits=2\.334\b"):
        allocate(costs, "avg-bits=2.3", damage={"x": {3: 1, 8: 0}, "y": {2: 1, 8: 0}})
    allocate(costs, "avg-bits=2.334", damage={"x": {3: 1, 8: 0}, "y": {2: 1, 8: 0}})
    assert format_budget("weight-bytes", 1_234_567) == "weight-bytes=1.235MB"
    assert format_budget("bops", 1.2e9) == "bops=1.2G"
    assert format_budget("avg-bits", 4.0) == "avg-bits=4"


def test_jointly_infeasible_budgets_name_each_minimum_given_the_others():
    costs = {"x": LayerCost(params=100, macs=1000, out_channels=0)}
    table = {"header": {"model": "m", "target": "t"}, "layers": {"x": {"w2a8": 5.0, "w8a8": 1.0}}}
    # 2-bit is cheap in BOPs but slow on this board: each budget alone is fine, not both
    with pytest.raises(BudgetInfeasibleError) as info:
        allocate(costs, "bops=16K,latency-ms=1", scores={"x": 1.0}, w_bits=(2, 8), a_bits=(8,), latency=table)
    message = str(info.value)
    assert "with latency-ms=1 the smallest feasible is bops=64K" in message
    assert "with bops=16K the smallest feasible is latency-ms=5" in message


# ----------------------------------------------------------------------------- budget strings


@pytest.mark.parametrize(
    "text, kind, limit",
    [
        ("avg-bits=4", "avg-bits", 4.0),
        (" avg-bits = 3.25 ", "avg-bits", 3.25),
        ("weight-bytes=1.5MB", "weight-bytes", 1.5e6),
        ("weight-bytes=1.5MiB", "weight-bytes", 1.5 * 2**20),
        ("weight-bytes=512KiB", "weight-bytes", 512 * 1024),
        ("weight-bytes=800kb", "weight-bytes", 800e3),
        ("weight-bytes=1200B", "weight-bytes", 1200.0),
        ("weight-bytes=1200", "weight-bytes", 1200.0),
        ("bops=1.2G", "bops", 1.2e9),
        ("bops=350M", "bops", 350e6),
        ("bops=2e9", "bops", 2e9),
        ("latency-ms=12", "latency-ms", 12.0),
        ("latency-ms=12.5ms", "latency-ms", 12.5),
    ],
)
def test_budget_strings(text, kind, limit):
    budget = parse_budget(text)
    assert (budget.kind, budget.limit) == (kind, pytest.approx(limit))


@pytest.mark.parametrize(
    "text",
    [
        "", "avg-bits", "avg-bits=", "avg-bits=four", "avg-bits=4bits", "avgbits=4", "size=1MB",
        "weight-bytes=1.5XB", "weight-bytes=1.5 M B", "bops=1.2Q", "bops=-1", "latency-ms=0",
        "latency-ms=12s", "avg-bits=4,avg-bits=3", "avg-bits=4,", "weight-bytes=1,5MB", "avg-bits=nan",
    ],
)
def test_malformed_budgets(text):
    with pytest.raises(PlanningError) as info:
        parse_budgets(text)
    assert info.value.exit_code == 30


def test_several_budgets():
    budgets = parse_budgets("avg-bits=4, latency-ms=12")
    assert [b.kind for b in budgets] == ["avg-bits", "latency-ms"]
    assert [str(b) for b in parse_budgets(["bops=1G", parse_budget("avg-bits=3")])] == ["bops=1G", "avg-bits=3"]


# ----------------------------------------------------------------------------- latency tables


def test_latency_table_file_round_trip(tmp_path):
    table = LatencyTable.from_json(_latency_table())
    again = LatencyTable.load(table.write(tmp_path / "lat.json"))
    assert again == table
    assert again.ms("attn.matmul_qk", 4, 4) == 0.3


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t, "not 'other'"),  # wrong model (checked against model_name below)
        (lambda t: t["header"].update(target="phone"), "target 'phone'"),
        (lambda t: t["layers"].pop("c"), "no times for layer 'c'"),
        (lambda t: t["layers"].update({"d": {"w8a8": 1.0}}), "layer 'd'"),
        (lambda t: t["header"].update(unit="s"), "unit"),
        (lambda t: t.pop("header"), "header"),
        (lambda t: t["header"].pop("model"), "model"),
        (lambda t: t["layers"]["a"].update({"x4": 1.0}), "x4"),
        (lambda t: t["layers"]["a"].update({"w4a8": -1.0}), "positive"),
        (lambda t: t["layers"].update({"a": {"w3a3": 1.0}}), "any candidate width"),
    ],
)
def test_latency_table_mismatch(edit, match):
    table = _latency_table()
    edit(table)
    model_name = "other" if match.startswith("not") else "toy"
    with pytest.raises(PlanningError, match=match) as info:
        allocate(COSTS, "latency-ms=10", scores=dict.fromkeys(COSTS, 1.0), w_bits=(2, 4, 8), a_bits=(4, 8),
                 latency=table, model_name=model_name, target="board")
    assert info.value.exit_code == 30


def test_latency_table_unreadable(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanningError, match="not valid JSON"):
        LatencyTable.load(bad)
    with pytest.raises(PlanningError, match="cannot read"):
        LatencyTable.load(tmp_path / "missing.json")


def test_latency_budget_needs_a_table():
    with pytest.raises(PlanningError, match="latency table"):
        allocate(COSTS, "latency-ms=10", scores=dict.fromkeys(COSTS, 1.0))


# ----------------------------------------------------------------------------- arguments


def test_bad_arguments():
    with pytest.raises(PlanningError, match="exactly one"):
        allocate(COSTS, "avg-bits=4")
    with pytest.raises(PlanningError, match="exactly one"):
        allocate(COSTS, "avg-bits=4", scores={"a": 1}, damage={"a": {4: 1}})
    with pytest.raises(PlanningError, match="benefit"):
        allocate(COSTS, "avg-bits=4", scores={"a": 1}, benefit="quadratic")
    with pytest.raises(PlanningError, match="2..8"):
        allocate(COSTS, "avg-bits=4", scores={"a": 1}, w_bits=(1, 4))
    with pytest.raises(PlanningError, match="non-negative"):
        allocate(COSTS, "avg-bits=4", scores={"a": -1})
    with pytest.raises(PlanningError, match="unknown planning method 'hessian'"):
        make_plan(torch.nn.Linear(2, 2), "hessian", "avg-bits=4")


# ----------------------------------------------------------------------------- layer costs


def test_layer_costs_of_the_reference_vit():
    torch.manual_seed(0)
    model = REFERENCE_MODELS["edgeq/vit-cifar10"].build()
    costs = layer_costs(model)  # input size from the model's pretrained_cfg: 3x32x32
    tokens = 64 + 1
    assert costs["patch_embed.proj"] == LayerCost(192 * 3 * 16, 64 * 192 * 3 * 16, 192, "conv")
    assert costs["blocks.0.attn.qkv"] == LayerCost(192 * 576, tokens * 192 * 576, 576, "linear")
    assert costs["blocks.5.mlp.fc2"] == LayerCost(768 * 192, tokens * 768 * 192, 192, "linear")
    assert costs["head"] == LayerCost(192 * 10, 192 * 10, 10, "linear")  # class token only
    assert costs["blocks.0.attn.matmul_qk"] == LayerCost(0, tokens * tokens * 192, 0, "matmul")
    assert costs["blocks.0.attn.matmul_av"] == costs["blocks.0.attn.matmul_qk"]
    assert list(costs)[:5] == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.matmul_qk",
                               "blocks.0.attn.matmul_av", "blocks.0.attn.proj"]
    assert len(costs) == 1 + 6 * 6 + 1
    assert len(layer_costs(model, (3, 32, 32), include_matmuls=False)) == 1 + 6 * 4 + 1


def test_layer_costs_of_the_reference_swin():
    torch.manual_seed(0)
    model = REFERENCE_MODELS["edgeq/swin-cifar10"].build()
    costs = layer_costs(model, (3, 32, 32))
    # stage 1: 16x16 tokens in 16 windows of 4x4, width 64
    assert costs["layers.0.blocks.0.attn.matmul_qk"].macs == 16 * 16 * 16 * 64
    assert costs["layers.0.blocks.0.attn.qkv"].macs == 256 * 64 * 192
    # patch merging 8x8 tokens of 4*64 channels down to 128
    assert costs["layers.1.downsample.reduction"] == LayerCost(256 * 128, 64 * 256 * 128, 128, "linear")
    assert costs["head.fc"].params == 256 * 10


def test_planner_layers_are_the_quantizers_and_unsupported_models_are_refused():
    from edgeq.errors import UnsupportedModelError
    from edgeq.plan import quantizable_layers
    from edgeq.quant import quantizable_layers as quantizer_layers

    torch.manual_seed(0)
    model = REFERENCE_MODELS["edgeq/swin-cifar10"].build()
    everything = quantizer_layers(model)
    assert quantizable_layers(model) == everything
    assert quantizable_layers(model, include_matmuls=False) == [n for n in everything if ".matmul_" not in n]
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        layer_costs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), (3, 2, 2))
