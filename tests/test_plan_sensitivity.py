"""Measured quantization sensitivity, the sensitivity and mix planners, and their bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import edgeq.plan.sensitivity as sensitivity
from edgeq.cli import main
from edgeq.errors import CalibrationError
from edgeq.plan import make_plan, measure_sensitivity, mix_damage, plan_metrics, layer_costs
from edgeq.quant import quantizable_layers

W_BITS, A_BITS = (2, 4, 8), (4, 8)
FRAGILE = "blocks.0.mlp.fc2"


def tiny_vit(fragile: bool = False) -> VisionTransformer:
    """A one-block ViT with confident predictions; ``fragile``: ``FRAGILE`` breaks under any weight quantization.

    Hidden unit 7 of the MLP is always off (GELU(-20) = 0), so a huge weight column of fc2 reading it changes
    nothing in float; quantized per output channel, that outlier sets every row's scale and rounds the row's
    real weights to zero.
    """
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
        mlp = model.blocks[0].mlp
        mlp.fc1.weight[7] = 0.0
        mlp.fc1.bias[7] = -20.0
        if fragile:
            mlp.fc2.weight[:, 7] = 100.0
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _measure(model, images, **kwargs):
    return measure_sensitivity(model, images, w_bits=W_BITS, a_bits=A_BITS, **kwargs)


def test_fragile_layer_has_the_highest_damage(images, single_thread):
    fragile = _measure(tiny_vit(fragile=True), images, cache=False)
    plain = _measure(tiny_vit(fragile=False), images, cache=False)
    with torch.no_grad():  # the outlier column is invisible in float
        torch.testing.assert_close(tiny_vit(True)(images), tiny_vit(False)(images))
    for width in [(4, 8), (8, 8)]:
        worst = max(fragile.kl, key=lambda name: fragile.kl[name].get(width, -1.0))
        assert worst == FRAGILE, width
        assert max(plain.kl, key=lambda name: plain.kl[name].get(width, -1.0)) != FRAGILE
    assert fragile.agreement[FRAGILE][(8, 8)] < plain.agreement[FRAGILE][(8, 8)]
    # more bits never hurt much on an ordinary layer
    assert plain.kl["blocks.0.attn.proj"][(2, 8)] > plain.kl["blocks.0.attn.proj"][(4, 8)] > plain.kl["blocks.0.attn.proj"][(8, 8)]


def test_table_layout_and_composed_damage(images, single_thread):
    model = tiny_vit()
    table = _measure(model, images, cache=False)
    assert list(table.kinds) == quantizable_layers(model)
    assert set(table.kl["blocks.0.attn.qkv"]) == {(2, 8), (4, 8), (8, 8), (8, 4)}
    assert set(table.kl["patch_embed.proj"]) == {(2, 8), (4, 8), (8, 8)}
    assert set(table.kl["blocks.0.attn.matmul_av"]) == {(4, 4), (8, 8)}
    damage = table.damage()
    qkv = table.kl["blocks.0.attn.qkv"]
    assert damage["blocks.0.attn.qkv"][(2, 4)] == pytest.approx(max(0.0, qkv[(2, 8)] + qkv[(8, 4)] - qkv[(8, 8)]))
    assert damage["patch_embed.proj"][(4, 4)] == damage["patch_embed.proj"][(4, 8)]  # its input width is fixed
    assert set(damage["blocks.0.attn.matmul_qk"]) == {(4, 4), (8, 8)}
    assert table.info["baseline"] == "float"
    assert table.info["held_out_images"] == 6 and table.info["calibration_images"] == 6
    restored = sensitivity.SensitivityTable.from_json(json.loads(json.dumps(table.to_json())))
    assert restored.kl == table.kl and restored.agreement == table.agreement and restored.damage() == damage


def test_deterministic_and_cached(images, monkeypatch, single_thread):
    model = tiny_vit()
    first = _measure(model, images)
    assert _measure(model, images, cache=False).kl == first.kl  # measured again: the same numbers

    def no_quantization(*args, **kwargs):
        raise AssertionError("a cached table was measured again")

    monkeypatch.setattr(sensitivity, "_quantized_layer", no_quantization)
    again = _measure(model, images)
    assert again.kl == first.kl and again.agreement == first.agreement
    # anything the key covers measures anew
    with pytest.raises(AssertionError, match="measured again"):
        _measure(model, images, method="minmax")
    with pytest.raises(AssertionError, match="measured again"):
        _measure(model, images + 0.01)
    changed = tiny_vit()
    with torch.no_grad():
        changed.head.bias.add_(0.1)
    with pytest.raises(AssertionError, match="measured again"):
        _measure(changed, images)


def test_gptq_trials_measure_reconstructed_layers(images, monkeypatch, single_thread):
    """reconstruct="gptq" rounds each weight trial with GPTQ: weight damage changes (less in all, at 2 bits), the
    attention matmuls (no weights) keep theirs, and the table is cached under its own key."""
    from edgeq.errors import PlanningError
    import edgeq.quant.reconstruct as reconstruct

    model = tiny_vit()
    plain = _measure(model, images, cache=False)
    rounded = []
    original = reconstruct.gptq_round_layer
    monkeypatch.setattr(reconstruct, "gptq_round_layer", lambda layer, h: (rounded.append(layer.name), original(layer, h)))
    gptq = _measure(model, images, reconstruct="gptq")
    weights = [name for name, kind in plain.kinds.items() if kind != "matmul"]
    assert sorted(set(rounded)) == sorted(weights)
    for name, kind in plain.kinds.items():
        if kind == "matmul":
            assert gptq.kl[name] == plain.kl[name]
    assert any(gptq.kl[name] != plain.kl[name] for name in weights)
    assert sum(gptq.kl[n][(2, 8)] for n in weights) < sum(plain.kl[n][(2, 8)] for n in weights)
    assert gptq.info["key"]["reconstruct"] == "gptq" and "reconstruct" not in plain.info["key"]
    assert _measure(model, images, reconstruct="gptq").kl == gptq.kl  # from the cache
    with pytest.raises(PlanningError, match="none or gptq"):
        _measure(model, images, reconstruct="adaround")


def test_damaged_cache_entry_is_measured_again(images, single_thread):
    model = tiny_vit()
    first = _measure(model, images)
    for entry in Path(sensitivity._cache_path(first.info["key"])).parent.glob("*.json"):
        entry.write_text("{not json")
    assert _measure(model, images).kl == first.kl


def test_too_few_images_for_a_held_out_slice():
    with pytest.raises(CalibrationError, match="held-out"):
        measure_sensitivity(tiny_vit(), torch.randn(6, 3, 16, 16))


def test_mix_damage_formula():
    damage = {"a": {(2, 8): 1.0, (8, 8): 0.1}, "b": {(2, 8): 2.0, (8, 8): 0.0}, "m": {(4, 4): 3.0}}
    mixed = mix_damage(damage, {"a": 0.75, "b": 0.25})  # mean 0.5: weights 1.25, 0.75; "m" unscored: 1
    assert mixed["a"] == {(2, 8): pytest.approx(1.25), (8, 8): pytest.approx(0.125)}
    assert mixed["b"] == {(2, 8): pytest.approx(1.5), (8, 8): 0.0}
    assert mixed["m"] == {(4, 4): 3.0}


@pytest.mark.parametrize("method", ["sensitivity", "mix"])
def test_sensitivity_and_mix_plans(method, images, single_thread):
    model = tiny_vit()
    plan, scores = make_plan(model, method, "avg-bits=4", images, input_size=(3, 16, 16), w_bits=W_BITS,
                             a_bits=A_BITS, model_name="tiny")
    costs = layer_costs(model, (3, 16, 16))
    assert set(plan.layers) == set(costs) and set(scores) == set(costs)
    assert plan_metrics(plan, costs)["avg-bits"] <= 4 + 1e-6
    info = plan.provenance
    assert info["method"] == method and info["objective"] == "damage" and info["model"] == "tiny"
    assert re.fullmatch(r"[0-9a-f]{64}", info["model_sha256"]) and re.fullmatch(r"[0-9a-f]{64}", info["calibration_sha256"])
    assert info["sensitivity"]["baseline"] == "float" and info["sensitivity"]["quant_method"] == "lrp-qvit"
    assert set(info["damage"]["blocks.0.attn.qkv"]) == {"w2a4", "w2a8", "w4a4", "w4a8", "w8a4", "w8a8"}
    # the chosen plan predicts no more damage than a feasible alternative: uniform w4a8 (matmuls a8)
    def predicted(bits_of):
        return sum(table[f"a{bits_of(name)[1]}" if name.endswith(("matmul_qk", "matmul_av")) else
                         f"w{bits_of(name)[0]}a{bits_of(name)[1]}"] for name, table in info["damage"].items())
    chosen = predicted(lambda name: (plan.bits_for(name).w, plan.bits_for(name).a))
    assert chosen <= predicted(lambda name: (4, 8)) + 1e-9
    if method == "mix":
        assert info["mix_formula"] == "damage_l(w, a) * (1 + r_l / mean(r)) / 2" and info["relevance"]
    assert "reconstruct" not in info["sensitivity"]
    rounded, _ = make_plan(model, method, "avg-bits=4", images, input_size=(3, 16, 16), w_bits=W_BITS,
                           a_bits=A_BITS, sensitivity_reconstruct="gptq")
    assert rounded.provenance["sensitivity"]["reconstruct"] == "gptq"
    assert rounded.provenance["damage"] != info["damage"]


# --------------------------------------------------------------------------- command line: bad input


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    return code, capsys.readouterr().err


def _plan_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib", str(folder), "--out", str(out),
            *extra]


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--method", "hessian", "--budget", "avg-bits=4"], 30, "unknown planning method 'hessian': use one of lrp, "
                                                                "sensitivity, nuclear, mix, random"),
        (["--method", "sensitivity", "--calib-count", "4", "--budget", "avg-bits=4"], 21,
         "sensitivity needs at least 4 calibration images plus a held-out slice (50% of them); got 4 images"),
        (["--method", "random", "--budget", "latency-ms=3", "--latency-table", "{swin_table}"], 30,
         "latency table is for model 'edgeq/swin-cifar10', not 'edgeq/vit-cifar10'"),
        (["--method", "random", "--budget", "latency-ms=3", "--latency-table", "{ghost_table}"], 30,
         "latency table names layer 'blocks.9.mlp.fc1' that the model being planned does not have"),
        (["--method", "mix", "--budget", "avg-bits=4", "--budget", "weight-bytes=1KB"], 31,
         "budget weight-bytes=1KB is infeasible: the smallest feasible is weight-bytes="),
    ],
    ids=["unknown-method", "too-few-images", "other-model-latency", "latency-unknown-layer", "infeasible"],
)
def test_plan_bad_input_is_one_line_and_keeps_the_previous_plan(capsys, tiny_folder, tmp_path, extra, code, message):
    from edgeq.models.reference import REFERENCE_MODELS
    from edgeq.plan import LatencyTable

    costs = layer_costs(REFERENCE_MODELS["edgeq/vit-cifar10"].build())
    layers = {name: {(8, 8): 0.1} for name in costs}
    LatencyTable("edgeq/swin-cifar10", "host", layers).write(tmp_path / "swin.json")
    LatencyTable("edgeq/vit-cifar10", "host", {**layers, "blocks.9.mlp.fc1": {(8, 8): 0.1}}).write(tmp_path / "ghost.json")
    out = tmp_path / "plan.json"
    out.write_text("previous\n")
    extra = [a.format(swin_table=tmp_path / "swin.json", ghost_table=tmp_path / "ghost.json") for a in extra]
    got, err = _run(capsys, *_plan_args(tiny_folder, out, *extra))
    assert got == code and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert out.read_text() == "previous\n"
