"""Whole small data sets (CIFAR-10) decoded once into uint8 arrays, for training."""
from __future__ import annotations

import os

import numpy as np

from edgeq.data.archive import cache_root, file_sha256, materialize, resolve_data_path
from edgeq.data.folder import ImageFolder


def load_uint8_arrays(spec: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N×H×W×3 uint8, labels N int64, class names); decoded arrays are cached by archive hash."""
    path = resolve_data_path(spec)
    key = file_sha256(path)[:20] if path.is_file() else None
    cached = cache_root() / "arrays" / f"{key}.npz" if key else None
    if cached is not None and cached.exists():
        with np.load(cached) as stored:
            return stored["images"], stored["labels"], list(stored["classes"])
    folder = ImageFolder(materialize(path))
    images = np.stack([np.asarray(folder.load_image(i)) for i in range(len(folder))])
    labels = np.asarray(folder.labels, dtype=np.int64)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.stem}.{os.getpid()}.partial.npz")  # one per process: concurrent runs
        np.savez(partial, images=images, labels=labels, classes=np.asarray(folder.classes))
        partial.replace(cached)
    return images, labels, folder.classes
