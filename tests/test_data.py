from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import CIFAR_VAL, write_archive, write_image_folder
from edgeq.data import ImageFolder, balanced_indices, load_image_folder, materialize, resolve_data_path
from edgeq.data.archive import cache_root
from edgeq.errors import DataError


def test_folder_classes_in_sorted_order(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", ["zebra", "ant", "moth"], per_class=2)
    folder = ImageFolder(root)
    assert folder.classes == ["ant", "moth", "zebra"]
    assert Counter(folder.labels) == {0: 2, 1: 2, 2: 2}


def test_archive_extracted_once_into_cache_keyed_by_hash(tiny_folder: Path, tmp_path: Path) -> None:
    archive = write_archive(tiny_folder, tmp_path / "tiny.tar.gz")
    first = materialize(archive)
    assert first.is_relative_to(cache_root())
    marker = first / ".complete"
    stamp = marker.stat().st_mtime_ns
    copy = tmp_path / "renamed.tgz"
    copy.write_bytes(archive.read_bytes())
    assert materialize(copy) == first
    assert marker.stat().st_mtime_ns == stamp
    folder = ImageFolder(first)
    assert folder.root.name == "val"
    assert len(folder) == 30


def test_extraction_finished_by_another_process_meanwhile_is_kept(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes extracting one archive at once: the later one must not delete the tree the first is reading."""
    import tarfile

    archive = write_archive(tiny_folder, tmp_path / "tiny.tar.gz")
    original = tarfile.TarFile.extractall
    state = {}

    def racing_extractall(self, path, *args, **kwargs):
        monkeypatch.setattr(tarfile.TarFile, "extractall", original)
        state["first"] = materialize(archive)  # the other process, finishing first
        state["stamp"] = (state["first"] / ".complete").stat().st_mtime_ns
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extractall", racing_extractall)
    second = materialize(archive)
    assert second == state["first"]
    assert (second / ".complete").stat().st_mtime_ns == state["stamp"]
    assert len(ImageFolder(second)) == 30
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".extract-")]


def test_data_path_resolved_under_edgeq_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image_folder(tmp_path / "root" / "sets" / "mini", ["a", "b"], per_class=1)
    monkeypatch.setenv("EDGEQ_DATA", str(tmp_path / "root"))
    assert resolve_data_path("sets/mini") == tmp_path / "root" / "sets" / "mini"


@pytest.mark.shared_cache
def test_shared_cifar_val_loads_with_model_preprocessing() -> None:
    from edgeq.models.reference import CIFAR10_CLASSES, CIFAR10_DATA_CONFIG

    dataset = load_image_folder(CIFAR_VAL, CIFAR10_DATA_CONFIG)
    assert len(dataset) == 5000
    assert tuple(dataset.classes) == CIFAR10_CLASSES
    image, label = dataset[0]
    assert tuple(image.shape) == (3, 32, 32) and label == 0
    assert -3.0 < float(image.min()) and float(image.max()) < 3.0


def test_balanced_indices_are_balanced_deterministic_and_prefix_stable() -> None:
    labels = [i % 4 for i in range(40)] + [4] * 2
    picked = balanced_indices(labels, 10, seed=7)
    assert picked == balanced_indices(labels, 10, seed=7)
    assert picked != balanced_indices(labels, 10, seed=8)
    counts = Counter(labels[i] for i in picked)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 5
    assert balanced_indices(labels, 25, seed=7)[:10] == picked
    assert len(set(balanced_indices(labels, 100, seed=1))) == len(labels)


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nowhere", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no class folders"),
        (lambda p: write_image_folder(p / "x", ["a"], 0), "no images"),
        (lambda p: _file(p / "file.txt", b"hi"), "neither a folder nor"),
        (lambda p: _file(p / "bad.tar.gz", b"not a tar"), "not a readable tar archive"),
    ],
)
def test_bad_data_paths_raise_data_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ImageFolder(materialize(make(tmp_path)))


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", ["a", "b"], per_class=1)
    broken = root / "b" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    folder = ImageFolder(root)
    index = [s.path for s in folder.samples].index(broken)
    with pytest.raises(DataError, match="unreadable image .*broken.jpg"):
        folder[index]
