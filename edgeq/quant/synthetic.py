"""Calibration images made from the model itself when no data is given (after PSAQ-ViT).

PSAQ-ViT's observation: on real images the cosine similarities between a block's patch tokens
spread widely, on noise they bunch up. Starting from Gaussian noise in the model's normalized
input space, a few Adam steps maximise, for every transformer block, the differential entropy
of the distribution of pairwise patch similarities (a Gaussian kernel density estimate on a
fixed grid), plus a cross-entropy term towards random target classes so the images spread over
the classes. Pixels are kept inside the range real normalized images can take.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

_GRID = torch.linspace(-1.0, 1.0, 32)
_BANDWIDTH = 0.08
_MAX_PAIRS = 512


def _similarity_entropy(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean over images of the KDE entropy of pairwise cosine similarities of ``tokens`` (B, T, C)."""
    feats = F.normalize(tokens.flatten(1, -2), dim=-1)
    sim = feats @ feats.transpose(1, 2)
    rows, cols = torch.triu_indices(sim.shape[1], sim.shape[2], offset=1)
    if rows.numel() > _MAX_PAIRS:
        keep = torch.randperm(rows.numel(), generator=generator)[:_MAX_PAIRS]
        rows, cols = rows[keep], cols[keep]
    values = sim[:, rows.to(sim.device), cols.to(sim.device)]       # B, P
    grid = _GRID.to(values.device).view(1, -1, 1)
    density = torch.exp(-0.5 * ((grid - values.unsqueeze(1)) / _BANDWIDTH) ** 2).mean(-1)
    density = density / density.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(density * density.clamp_min(1e-12).log()).sum(-1).mean()


def _input_bounds(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.5,) * channels), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * channels), dtype=torch.float32).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def synthesize_calibration(
    model: nn.Module,
    input_size: tuple[int, int, int],
    count: int = 32,
    steps: int = 40,
    seed: int = 0,
    lr: float = 0.1,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> torch.Tensor:
    """``count`` synthetic, already normalized images of ``input_size`` (C, H, W), on the model's device (the
    random draws are the CPU's, so a seed gives the same start on every device)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    low, high = (bound.to(device) for bound in _input_bounds(model, input_size[0]))
    images = torch.randn((count, *input_size), generator=generator).to(device)
    images = images.clamp(low, high).requires_grad_(True)
    num_classes = getattr(model, "num_classes", 0) or 0
    targets = torch.randint(num_classes, (count,), generator=generator).to(device) if num_classes > 0 else None

    blocks = [m for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))]
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in blocks]
    prefix = getattr(model, "num_prefix_tokens", 0) or 0
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in saved:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([images], lr=lr)
    try:
        for step in range(steps):
            captured.clear()
            optimizer.zero_grad()
            logits = model(images)
            loss = torch.zeros((), device=device)
            for out in captured:
                tokens = out[:, prefix:] if out.dim() == 3 else out
                loss = loss - _similarity_entropy(tokens, generator) / max(len(captured), 1)
            if targets is not None and logits.dim() == 2:
                loss = loss + F.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                images.copy_(torch.maximum(torch.minimum(images, high), low))
            if progress is not None:
                progress(step + 1, steps, "synthetic calibration images")
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return images.detach()
