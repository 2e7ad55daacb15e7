"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT) and LRP-QViT clipping.

Channel-wise quantization of the LayerNorm output ``y`` with per-channel scale ``s_c`` and integer
zero point ``z_c`` is turned into layer-wise quantization with ``s~ = mean(s)`` and
``z~ = clamp(round(mean(z)), qmin, qmax)``. With ``r1 = s / s~`` and ``r2 = z - z~`` (an integer):

    LayerNorm:   gamma' = gamma / r1           beta' = (beta + s * r2) / r1
    next Linear: W'     = W * r1 (per column)   b'    = b - W @ (s * r2)

so ``y' = (y + s r2) / r1``, ``round(y'/s~) + z~ == round(y/s) + z`` code for code, and
``W' dequant(y') + b' == W dequant_channelwise(y) + b`` exactly in real arithmetic.

Clipping (LRP-QViT's clipped channel-wise quantization; the exact rule is ours): a few post-LN
channels have ranges tens of times wider than the rest. Folding makes ``r1`` of such a channel
large, so its column of ``W'`` dominates the per-output-channel weight ranges and every other
column loses weight precision. Before folding, each channel's range is therefore capped at
``kappa`` times the median channel range, shrunk about the channel's own centre:

    width_c = hi_c - lo_c,  cap = kappa * median_c(width_c)
    if width_c > cap:  lo_c, hi_c = mid_c - cap/2, mid_c + cap/2   (mid_c = (lo_c + hi_c) / 2)

which bounds ``max r1 / median r1`` by ``kappa`` and saturates only the tails of outlier
channels. ``kappa`` is chosen per LayerNorm from ``QuantConfig.clip_candidates`` and "no clip" by
the mean squared error of the consuming Linear's output (quantized reparameterized weights and
quantized activations, against float) on the calibration tokens, so clipping is only used where
it lowers that error; "no clip" is exactly RepQ-ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeq.quant.quantizers import uniform_params

# A channel whose range is (nearly) zero would get a scale near zero and a huge r1^-1 in
# the LayerNorm; scales are floored at this fraction of the median channel scale.
MIN_SCALE_FRACTION = 1e-3


def clip_ranges(lo: torch.Tensor, hi: torch.Tensor, kappa: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cap every channel's range at ``kappa`` times the median range, about its centre."""
    if kappa is None:
        return lo, hi
    width = hi - lo
    cap = kappa * width.median()
    mid = (lo + hi) / 2
    too_wide = width > cap
    return torch.where(too_wide, mid - cap / 2, lo), torch.where(too_wide, mid + cap / 2, hi)


def channel_params(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, integer zero point); the range need not contain zero (the fold absorbs z)."""
    scale, zp = uniform_params(lo, hi, qmin, qmax, symmetric, include_zero=False)
    floor = MIN_SCALE_FRACTION * scale.median()
    if bool((scale < floor).any()):
        small = scale < floor
        centre = (lo + hi) / 2
        scale = torch.where(small, floor, scale)
        if not symmetric:
            zp = torch.where(small, torch.round((qmin + qmax) / 2 - centre / scale), zp)
    return scale, zp


@dataclass(frozen=True)
class Fold:
    """Channel-wise (scale, zero point) and the layer-wise pair they fold into."""

    scale: torch.Tensor          # s, per channel
    zero_point: torch.Tensor     # z, per channel (integer-valued)
    layer_scale: torch.Tensor    # s~
    layer_zero_point: torch.Tensor  # z~ (integer-valued, inside [qmin, qmax])

    @property
    def r1(self) -> torch.Tensor:
        return self.scale / self.layer_scale

    @property
    def r2(self) -> torch.Tensor:
        return self.zero_point - self.layer_zero_point

    @property
    def shift(self) -> torch.Tensor:
        """s * r2: what the fold adds to each channel before dividing by r1."""
        return self.scale * self.r2


def make_fold(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> Fold:
    layer_scale = scale.mean()
    layer_zero_point = torch.clamp(torch.round(zero_point.mean()), qmin, qmax)
    return Fold(scale, zero_point, layer_scale, layer_zero_point)


def fold_activation(y: torch.Tensor, fold: Fold) -> torch.Tensor:
    """What the folded LayerNorm outputs where the original output ``y``."""
    return (y + fold.shift) / fold.r1


def fold_norm_affine(weight: torch.Tensor, bias: torch.Tensor, fold: Fold) -> tuple[torch.Tensor, torch.Tensor]:
    return weight / fold.r1, (bias + fold.shift) / fold.r1


def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, fold: Fold) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the Linear that reads the folded LayerNorm."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight * fold.r1, bias - weight @ fold.shift


@torch.no_grad()
def fold_layernorm_(norm: torch.nn.LayerNorm, fold: Fold) -> None:
    """Fold in place into ``norm``'s affine parameters."""
    weight, bias = fold_norm_affine(norm.weight.double(), norm.bias.double(), _double(fold))
    norm.weight.copy_(weight.to(norm.weight.dtype))
    norm.bias.copy_(bias.to(norm.bias.dtype))


def _double(fold: Fold) -> Fold:
    return Fold(*(t.double() for t in (fold.scale, fold.zero_point, fold.layer_scale, fold.layer_zero_point)))


def fold_linear_double(weight: torch.Tensor, bias: torch.Tensor | None, fold: Fold) -> tuple[torch.Tensor, torch.Tensor]:
    """``fold_linear`` computed in float64 and returned in the weight's dtype."""
    w, b = fold_linear(weight.double(), None if bias is None else bias.double(), _double(fold))
    return w.to(weight.dtype), b.to(weight.dtype)
