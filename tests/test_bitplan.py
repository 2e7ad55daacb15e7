from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.bitplan import BitPlan, LayerBits, read_plan, resolve_plan, write_plan
from edgeq.errors import BitPlanError


def test_round_trip(tmp_path: Path) -> None:
    plan = BitPlan(LayerBits(8, 8), {"blocks.3.mlp.fc1": LayerBits(4, 8), "head": LayerBits(6, 6)},
                   {"method": "lrp", "budget": "avg-bits=4"})
    path = write_plan(plan, tmp_path / "plan.json")
    assert read_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["default"] == {"w": 8, "a": 8}
    assert plan.bits_for("blocks.3.mlp.fc1") == LayerBits(4, 8) and plan.bits_for("blocks.0.attn.qkv") == LayerBits(8, 8)


@pytest.mark.parametrize("spec, bits", [("w8a8", (8, 8)), ("W4A4", (4, 4)), ("w3a6", (3, 6))])
def test_uniform_specs(spec: str, bits: tuple[int, int]) -> None:
    assert resolve_plan(bits=spec).default == LayerBits(*bits)


@pytest.mark.parametrize("spec", ["w9a8", "w1a8", "w8a0", "int8", "w8"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(BitPlanError):
        BitPlan.from_spec(spec)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"version": 2, "default": {"w": 8, "a": 8}}', "unsupported bit plan version 2"),
        ('{"version": 1}', "missing \"default\""),
        ('{"version": 1, "default": {"w": 8}}', "expected {\"w\": bits, \"a\": bits}"),
        ('{"version": 1, "default": {"w": 8, "a": 8}, "layers": {"x": {"w": 12, "a": 8}}}', "from 2 to 8, got 12"),
        ('{"version": 1, "default": {"w": 8.5, "a": 8}}', "got 8.5"),
    ],
)
def test_malformed_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(BitPlanError, match=message.replace("{", r"\{").replace("}", r"\}")):
        read_plan(path)


def test_unknown_layers_list_closest_names() -> None:
    plan = BitPlan(LayerBits(8, 8), {"blocks.3.mlp.fc3": LayerBits(4, 8)})
    known = ["blocks.3.mlp.fc1", "blocks.3.mlp.fc2", "head"]
    with pytest.raises(BitPlanError, match="'blocks.3.mlp.fc3'.*closest: blocks.3.mlp.fc2, blocks.3.mlp.fc1"):
        plan.check_layers(known)
    BitPlan(LayerBits(8, 8), {"head": LayerBits(4, 4)}).check_layers(known)


def test_failed_write_keeps_previous_plan(tmp_path: Path) -> None:
    path = write_plan(BitPlan.uniform(8, 8), tmp_path / "plan.json")
    before = path.read_text()
    with pytest.raises(TypeError):
        write_plan(BitPlan(LayerBits(4, 4), {}, {"bad": object()}), path)
    assert path.read_text() == before
    assert resolve_plan(plan_path=path) == BitPlan.uniform(8, 8)
    with pytest.raises(BitPlanError, match="not both"):
        resolve_plan(bits="w4a4", plan_path=path)


def test_readme_plan_example_is_a_valid_plan_for_the_reference_vit() -> None:
    import re

    from edgeq.models import create_model
    from edgeq.quant import quantizable_layers

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"## Bit plans.*?```json\n(.*?)```", readme, re.S).group(1)
    plan = BitPlan.from_json(json.loads(example))
    plan.check_layers(quantizable_layers(create_model("edgeq/vit-cifar10", pretrained=False)))
    assert plan.bits_for("blocks.0.mlp.fc1").w == 4 and plan.bits_for("blocks.3.mlp.fc1").w == 8
