"""The reference models edgeq ships: small timm transformers trained on CIFAR-10.

Their architectures live here and nowhere else; ``tools/train_reference.py``
trains exactly these, and the weights land in ``edgeq/models/weights/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

WEIGHTS_DIR = Path(__file__).parent / "weights"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Images are already 32x32: crop_pct 1.0 makes timm's eval transform a plain
# resize-to-32 (a no-op) followed by normalisation with CIFAR-10 statistics.
CIFAR10_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2470, 0.2435, 0.2616),
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    summary: str
    factory: Callable[..., torch.nn.Module]
    arch: dict[str, Any]
    data_config: dict[str, Any] = field(default_factory=lambda: dict(CIFAR10_DATA_CONFIG))

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name.split('/', 1)[1]}.safetensors"

    @property
    def card_path(self) -> Path:
        return self.weights_path.with_suffix(".md")

    def build(self, **overrides: Any) -> torch.nn.Module:
        """The architecture with random weights; ``overrides`` reach the timm constructor (e.g. drop_path_rate)."""
        model = self.factory(**{**self.arch, **overrides})
        model.pretrained_cfg = dict(self.data_config, architecture=self.name, num_classes=model.num_classes)
        return model


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in (
        ReferenceModel(
            name="edgeq/vit-cifar10",
            summary="timm VisionTransformer, 32x32 input, patch 4, width 192, 3 heads, depth 6, class token",
            factory=VisionTransformer,
            arch=dict(
                img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0,
                num_classes=10, class_token=True, global_pool="token", drop_path_rate=0.0,
            ),
        ),
        ReferenceModel(
            name="edgeq/swin-cifar10",
            summary="timm SwinTransformer, 32x32 input, patch 2, window 4, dims 64-128-256, depths 2-2-2",
            factory=SwinTransformer,
            arch=dict(
                img_size=32, patch_size=2, window_size=4, embed_dim=64, depths=(2, 2, 2),
                num_heads=(2, 4, 8), mlp_ratio=4.0, num_classes=10, drop_path_rate=0.0,
            ),
        ),
    )
}
