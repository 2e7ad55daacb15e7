"""Data sets: ImageFolder folders and archives, preprocessing from the model, balanced sampling."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from edgeq.data.archive import materialize, resolve_data_path
from edgeq.data.folder import ImageFolder
from edgeq.data.sampling import balanced_indices
from edgeq.data.transforms import data_config, eval_transform

__all__ = [
    "ImageFolder",
    "balanced_indices",
    "data_config",
    "eval_transform",
    "load_image_folder",
    "make_loader",
    "materialize",
    "resolve_data_path",
]


def load_image_folder(spec: str | os.PathLike, config: dict[str, Any] | None = None) -> ImageFolder:
    """An ImageFolder for a folder or archive, preprocessed for a model's data config."""
    transform = eval_transform(config) if config is not None else None
    return ImageFolder(materialize(spec), transform=transform)


def make_loader(
    dataset: ImageFolder, indices: Sequence[int] | None = None, batch_size: int = 64
) -> torch.utils.data.DataLoader:
    # No worker processes: errors about unreadable images must surface as
    # edgeq errors in this process, and 32x32 images decode faster than workers start.
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
