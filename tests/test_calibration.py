from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from edgeq.data.calibration import CalibrationRecipe, load_calibration, read_recipe, resolve_recipe
from edgeq.errors import DataError
from edgeq.models.reference import CIFAR10_DATA_CONFIG


def test_bundled_recipes_parse() -> None:
    recipes = {p.name: read_recipe(p) for p in (REPO / "calibration").glob("*.yaml")}
    assert recipes["cifar10-32.yaml"] == CalibrationRecipe("cifar10/train.tar.gz", 32, 0, "train")
    assert recipes


def test_folder_spec_with_overrides(tiny_folder: Path) -> None:
    recipe = resolve_recipe(tiny_folder, count=12, seed=3)
    assert recipe == CalibrationRecipe(str(tiny_folder), 12, 3, "train")
    first = load_calibration(recipe, CIFAR10_DATA_CONFIG)
    again = load_calibration(recipe, CIFAR10_DATA_CONFIG)
    assert first.images.shape == (12, 3, 32, 32)
    assert sorted(first.labels.tolist()) == sorted([i % 10 for i in range(12)])
    assert first.files == again.files and first.digest == again.digest
    assert load_calibration(resolve_recipe(tiny_folder, count=12, seed=4), CIFAR10_DATA_CONFIG).digest != first.digest


def test_recipe_relative_to_its_folder(tmp_path: Path, tiny_folder: Path) -> None:
    recipe_file = tmp_path / "tiny" / "r.yaml"
    recipe_file.write_text("data: val\ncount: 4\n")
    assert read_recipe(recipe_file).data == str(tmp_path / "tiny" / "val")


@pytest.mark.parametrize(
    "text, message",
    [("data: [unclosed", "not valid YAML"), ("count: 3\n", "needs at least a 'data:'"),
     ("data: x\ncount: 0\n", "count must be a positive integer"), ("data: x\nsize: 3\n", "unknown keys: size")],
)
def test_bad_recipes(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_recipe(path)
