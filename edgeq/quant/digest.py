"""Content hashes of a model's weights and of an image batch: the keys of every cache of measured results
(sensitivity tables, reconstructed models), so a cached result is reused only for the same weights and images."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["model_digest", "images_digest"]


def model_digest(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_digest(images: torch.Tensor) -> str:
    """sha256 of a float32 image batch (as :class:`edgeq.data.calibration.CalibrationSet` names it)."""
    return hashlib.sha256(images.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
