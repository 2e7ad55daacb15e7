"""Calibration sets: a data source, a count and a seed, given inline or as a YAML recipe.

Recipe format (``calibration/*.yaml``)::

    data: cifar10/train.tar.gz   # folder or archive; relative paths are also tried under $EDGEQ_DATA
    count: 32                    # images, class-balanced
    seed: 0
    split: train                 # informative: which split the images come from
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from edgeq.data.folder import ImageFolder
from edgeq.data.sampling import balanced_indices
from edgeq.errors import DataError
from edgeq.fileio import read_yaml

RECIPE_SUFFIXES = (".yaml", ".yml")
DEFAULT_COUNT = 32


@dataclass(frozen=True)
class CalibrationRecipe:
    data: str
    count: int = DEFAULT_COUNT
    seed: int = 0
    split: str = "train"


def read_recipe(path: str | os.PathLike) -> CalibrationRecipe:
    path = Path(path)
    raw: Any = read_yaml(path, DataError, "calibration recipe")
    if not isinstance(raw, dict) or "data" not in raw:
        raise DataError(f"calibration recipe {path} needs at least a 'data:' entry")
    unknown = set(raw) - {"data", "count", "seed", "split"}
    if unknown:
        raise DataError(f"calibration recipe {path} has unknown keys: {', '.join(sorted(unknown))}")
    if not isinstance(raw.get("count", DEFAULT_COUNT), int) or raw.get("count", DEFAULT_COUNT) < 1:
        raise DataError(f"calibration recipe {path}: count must be a positive integer")
    if not isinstance(raw.get("seed", 0), int) or isinstance(raw.get("seed", 0), bool):
        raise DataError(f"calibration recipe {path}: seed must be an integer")
    data = str(raw["data"])
    # A relative data path in a recipe that is not found as given is tried beside the recipe too.
    if not Path(data).is_absolute() and not Path(data).exists() and (path.parent / data).exists():
        data = str(path.parent / data)
    return CalibrationRecipe(data=data, count=raw.get("count", DEFAULT_COUNT), seed=raw.get("seed", 0),
                             split=str(raw.get("split", "train")))


def resolve_recipe(spec: str | os.PathLike, count: int | None = None, seed: int | None = None) -> CalibrationRecipe:
    """A recipe file, or a data folder/archive with the given (or default) count and seed."""
    if str(spec).lower().endswith(RECIPE_SUFFIXES):
        recipe = read_recipe(spec)
    else:
        recipe = CalibrationRecipe(data=str(spec))
    overrides = {k: v for k, v in (("count", count), ("seed", seed)) if v is not None}
    return CalibrationRecipe(**{**asdict(recipe), **overrides})


@dataclass(frozen=True)
class CalibrationSet:
    images: torch.Tensor
    labels: torch.Tensor
    recipe: CalibrationRecipe
    files: tuple[str, ...]

    @property
    def digest(self) -> str:
        """sha256 over the preprocessed images: names the exact calibration input in manifests."""
        return hashlib.sha256(self.images.numpy().tobytes()).hexdigest()


def load_calibration(recipe: CalibrationRecipe, config: dict[str, Any]) -> CalibrationSet:
    from edgeq.data import load_image_folder

    dataset: ImageFolder = load_image_folder(recipe.data, config)
    indices = balanced_indices(dataset.labels, recipe.count, recipe.seed)
    images, labels = zip(*(dataset[i] for i in indices))
    return CalibrationSet(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        recipe=recipe,
        files=tuple(str(dataset.samples[i].path.relative_to(dataset.root)) for i in indices),
    )
