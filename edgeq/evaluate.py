"""Top-1/top-5 accuracy of a model on an ImageFolder data set, reported with timm validate.py's keys."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from edgeq.data import ImageFolder, make_loader
from edgeq.errors import ClassCountError

Progress = Callable[[int, int], None]


def model_num_classes(model: torch.nn.Module) -> int | None:
    value = getattr(model, "num_classes", None)
    return int(value) if isinstance(value, int) else None


def check_class_count(model: torch.nn.Module, dataset: ImageFolder) -> None:
    outputs = model_num_classes(model)
    if outputs is not None and outputs != len(dataset.classes):
        raise ClassCountError(
            f"data at {dataset.root} has {len(dataset.classes)} classes but the model has {outputs} outputs"
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: ImageFolder,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> dict[str, Any]:
    check_class_count(model, dataset)
    model.eval()
    loader = make_loader(dataset, indices, batch_size)
    total = len(loader.dataset)
    correct1 = correct5 = seen = 0
    for images, labels in loader:
        logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        seen += len(labels)
        if progress is not None:
            progress(seen, total)
    top1 = 100.0 * correct1 / seen
    top5 = 100.0 * correct5 / seen
    return {
        "top1": round(top1, 3),
        "top1_err": round(100.0 - top1, 3),
        "top5": round(top5, 3),
        "top5_err": round(100.0 - top5, 3),
        "num_images": seen,
    }
