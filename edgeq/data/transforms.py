"""Preprocessing resolved from the model, as timm does it."""
from __future__ import annotations

from typing import Any

import timm.data
import torch


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    return timm.data.resolve_model_data_config(model)


_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def eval_transform(config: dict[str, Any]):
    return timm.data.create_transform(**{k: config[k] for k in _TRANSFORM_KEYS if k in config}, is_training=False)
