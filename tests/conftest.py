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
    config.addinivalue_line("markers", "board: needs the emulated aarch64 board (qemu; builds a ~500 MB sysroot once)")


# --- quantization tests (tests/test_quant_*.py) ---------------------------------------------------

@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: its many small tensor ops run faster without thread hand-off."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_reference(name: str, seed: int = 0, **overrides):
    """A reference architecture with seeded random weights, in eval mode."""
    import torch

    from edgeq.models.reference import REFERENCE_MODELS

    torch.manual_seed(seed)
    return REFERENCE_MODELS[name].build(**overrides).eval()


@pytest.fixture(scope="session")
def build():
    """``build(name, seed=0, **overrides)``: see ``build_reference``."""
    return build_reference


@pytest.fixture(scope="session")
def vit_model():
    return build_reference("edgeq/vit-cifar10")


@pytest.fixture(scope="session")
def swin_model():
    return build_reference("edgeq/swin-cifar10")


@pytest.fixture(scope="session")
def calib_images():
    import torch

    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def test_images():
    import torch

    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
