from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EDGEQ_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("EDGEQ_DATA", str(SHARED_DATA))
CIFAR_VAL = SHARED_DATA / "cifar10" / "val.tar.gz"


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
    return root


def write_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A 10-class ImageFolder of random 32x32 images, wrapped in a top folder like the shared archives."""
    return write_image_folder(tmp_path / "tiny" / "val", [f"c{i}" for i in range(10)], per_class=3)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, request) -> None:
    """Tests extract their own archives into a private cache; the shared data keeps the user cache."""
    if "shared_cache" not in request.keywords:
        monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path_factory.mktemp("cache")))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_cache: use the user's edgeq cache (for the large shared data sets)")
