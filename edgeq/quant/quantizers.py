"""Quantizer arithmetic: uniform (asymmetric/symmetric) and log-sqrt(2)/log2, plus MSE range searches.

Uniform: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x_hat = (q - zero_point) * scale``,
with ``round`` half to even (``torch.round``).

Integer ranges (``int_range``):
- weights are signed: asymmetric ``[-2^(b-1), 2^(b-1)-1]``; symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]``
  with zero point 0 (the restricted range keeps ``-q`` representable);
- activations are unsigned ``[0, 2^b-1]`` when asymmetric, signed restricted when symmetric.

Log-sqrt(2) (post-Softmax, RepQ-ViT): codes ``q = round(-2 log2(x / s))`` clamped at 0; code
``2^b - 1`` is reserved for zero (``x <= 0`` or ``q >= 2^b - 1``), so codes ``0 .. 2^b-2`` stand
for ``s * 2^(-q/2)``. At inference the same codes are read as log2: ``e = ceil(q/2)`` is a right
shift and an odd code multiplies by ``1 + M / 2^F`` with ``M = round((sqrt(2) - 1) * 2^F)``
(``F = log2_frac_bits``, 8 by default: ``M = 106``), i.e.
``x_hat = s * 2^-e * (2^F + (q mod 2) * M) / 2^F``. The only difference from log-sqrt(2) is the
rounding of sqrt(2) - 1 to ``M / 2^F``: per element at most ``s * 2^-e * |sqrt(2) - 1 - M/2^F|``
(``log2_vs_sqrt2_bound``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

SQRT2_MINUS_1 = math.sqrt(2.0) - 1.0
_EPS = 1e-8


def int_range(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def uniform_params(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool, include_zero: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) covering [lo, hi]; zero points are integer-valued float tensors."""
    lo = torch.as_tensor(lo, dtype=torch.float32) if not torch.is_tensor(lo) else lo
    hi = torch.as_tensor(hi, dtype=lo.dtype) if not torch.is_tensor(hi) else hi
    if include_zero or symmetric:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        scale = torch.clamp(scale, min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=_EPS)
    zero_point = torch.round(qmin - lo / scale)
    return scale, zero_point


def quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as a float tensor holding integers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quant(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def _subsample(flat: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if flat.numel() <= limit:
        return flat
    gen = torch.Generator().manual_seed(seed)
    return flat[torch.randperm(flat.numel(), generator=gen)[:limit].to(flat.device)]


def subsample_rows(x2d: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if x2d.shape[0] <= limit:
        return x2d
    gen = torch.Generator().manual_seed(seed)
    return x2d[torch.randperm(x2d.shape[0], generator=gen)[:limit].to(x2d.device)]


def _sorted_at(sorted_x: torch.Tensor, p: float) -> torch.Tensor:
    index = int(round(p * (sorted_x.numel() - 1)))
    return sorted_x[index]


Consumer = Callable[[torch.Tensor], torch.Tensor]


def _tensor_candidates(
    x: torch.Tensor, percentiles: Sequence[float], symmetric: bool, max_elements: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lo, hi) per percentile: p = 1 is the exact min/max of ``x``, the others come from a subsample."""
    x = x.detach().float()
    lo_all, hi_all = torch.aminmax(x)
    amax = torch.maximum(lo_all.abs(), hi_all.abs())
    ordered = None
    candidates = []
    for p in percentiles:
        if p == 1.0:
            candidates.append((-amax, amax) if symmetric else (lo_all, hi_all))
            continue
        if ordered is None:
            flat = _subsample(x.reshape(-1), max_elements, seed)
            ordered = torch.sort(flat.abs() if symmetric else flat).values
        if symmetric:
            top = _sorted_at(ordered, p)
            candidates.append((-top, top))
        else:
            candidates.append((_sorted_at(ordered, 1.0 - p), _sorted_at(ordered, p)))
    return candidates


def _error(x_hat: torch.Tensor, target: torch.Tensor, consumer: Optional[Consumer]) -> float:
    out = consumer(x_hat) if consumer is not None else x_hat
    return float((out - target).pow(2).mean())


def search_per_tensor(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    percentiles: Sequence[float],
    max_elements: int = 1 << 16,
    seed: int = 0,
    sample: Optional[torch.Tensor] = None,
    consumer: Optional[Consumer] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (scale, zero point): the percentile candidate with the smallest MSE.

    The MSE is of ``x`` itself (on a subsample), or, with ``consumer``, of what the consuming
    operation makes of ``sample`` (a structured subsample of ``x``: rows of a Linear's input, a
    few heads of a matmul operand): ``mean((consumer(Q(sample)) - consumer(sample))^2)``.
    """
    candidates = _tensor_candidates(x, percentiles, symmetric, max_elements, seed)
    if len(candidates) == 1:
        return uniform_params(*candidates[0], qmin, qmax, symmetric)
    if sample is None:
        sample = _subsample(x.detach().reshape(-1).float(), max_elements, seed)
    target = consumer(sample) if consumer is not None else sample
    best = None
    for lo, hi in candidates:
        scale, zp = uniform_params(lo, hi, qmin, qmax, symmetric)
        err = _error(fake_quant(sample, scale, zp, qmin, qmax), target, consumer)
        if best is None or err < best[0]:
            best = (err, scale, zp)
    return best[1], best[2]


def _column_percentiles(x2d: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """Nearest-rank percentiles of every column: row ``i`` of the result is the ``probs[i]`` percentile.

    Only the tails are needed (percentiles near 0 and 1), so two ``topk`` replace a full sort.
    """
    n = x2d.shape[0]
    ranks = [int(round(p * (n - 1))) for p in probs]
    low = [r for r in ranks if r < n / 2]
    high = [r for r in ranks if r >= n / 2]
    k_low = max(low, default=-1) + 1
    k_high = n - min(high, default=n)
    bottom = torch.topk(x2d, k_low, dim=0, largest=False).values if k_low else None   # bottom[j] = sorted[j]
    top = torch.topk(x2d, k_high, dim=0, largest=True).values if k_high else None     # top[j] = sorted[n-1-j]
    return torch.stack([bottom[r] if r < n / 2 else top[n - 1 - r] for r in ranks])


def channel_candidates(x2d: torch.Tensor, percentiles: Sequence[float], symmetric: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-column (lo, hi) candidates, one pair per percentile."""
    x2d = x2d.float()
    if tuple(percentiles) == (1.0,):
        lo, hi = torch.aminmax(x2d, dim=0)
        return [(-torch.maximum(lo.abs(), hi.abs()), torch.maximum(lo.abs(), hi.abs()))] if symmetric else [(lo, hi)]
    if symmetric:
        q = _column_percentiles(x2d.abs(), list(percentiles))
        return [(-q[i], q[i]) for i in range(len(percentiles))]
    q = _column_percentiles(x2d, [v for p in percentiles for v in (1.0 - p, p)])
    return [(q[2 * i], q[2 * i + 1]) for i in range(len(percentiles))]


def search_per_channel_range(
    x2d: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    percentiles: Sequence[float],
    include_zero: bool = True,
    extremes: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (lo, hi) of ``x2d`` (rows are samples): the percentile with the smallest MSE per column.

    ``extremes``: the exact per-column (min, max) when ``x2d`` is a subsample; they stand in for p = 1.
    """
    x2d = x2d.float()
    candidates = channel_candidates(x2d, percentiles, symmetric)
    if extremes is not None:
        lo, hi = extremes
        amax = torch.maximum(lo.abs(), hi.abs())
        candidates = [((-amax, amax) if symmetric else (lo, hi)) if p == 1.0 else c
                      for p, c in zip(percentiles, candidates)]
    if len(candidates) == 1:
        return candidates[0]
    best_err = best_lo = best_hi = None
    for lo, hi in candidates:
        scale, zp = uniform_params(lo, hi, qmin, qmax, symmetric, include_zero)
        err = (fake_quant(x2d, scale, zp, qmin, qmax) - x2d).pow(2).mean(dim=0)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo.clone(), hi.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def weight_params(
    weight: torch.Tensor, bits: int, symmetric: bool, percentiles: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-output-channel (scale, zero point, qmin, qmax) of a weight whose first dim is the output channel."""
    qmin, qmax = int_range(bits, signed=True, symmetric=symmetric)
    columns = weight.detach().reshape(weight.shape[0], -1).t()
    lo, hi = search_per_channel_range(columns, qmin, qmax, symmetric, percentiles)
    scale, zp = uniform_params(lo, hi, qmin, qmax, symmetric)
    return scale, zp, qmin, qmax


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return quantize(weight, scale.view(shape), zero_point.view(shape), qmin, qmax)


# --- log-sqrt(2) / log2 -------------------------------------------------------------------------

def log_zero_code(bits: int) -> int:
    return 2 ** bits - 1


def log2_odd_multiplier(frac_bits: int) -> int:
    return int(round(SQRT2_MINUS_1 * 2 ** frac_bits))


def log_codes(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """Log-sqrt(2) codes (float tensor of integers); the zero code for x <= 0 and underflow."""
    zero = log_zero_code(bits)
    ratio = x / scale
    positive = ratio > 0
    t = torch.round(-2.0 * torch.log2(torch.where(positive, ratio, torch.ones_like(ratio))))
    t = torch.clamp(t, min=0.0)
    return torch.where(positive & (t < zero), t, torch.full_like(t, float(zero)))


def log_sqrt2_dequant(codes: torch.Tensor, scale, bits: int) -> torch.Tensor:
    value = scale * torch.exp2(-codes / 2.0)
    return torch.where(codes == log_zero_code(bits), torch.zeros_like(value), value)


def log2_dequant(codes: torch.Tensor, scale, bits: int, frac_bits: int) -> torch.Tensor:
    """The inference reading of the codes: shift by ceil(q/2), odd codes times (2^F + M) / 2^F."""
    shift = torch.ceil(codes / 2.0)
    odd = codes - 2.0 * torch.floor(codes / 2.0)
    mantissa = (2 ** frac_bits + odd * log2_odd_multiplier(frac_bits)) / 2 ** frac_bits
    value = scale * mantissa * torch.exp2(-shift)
    return torch.where(codes == log_zero_code(bits), torch.zeros_like(value), value)


def log2_vs_sqrt2_bound(codes: torch.Tensor, scale, frac_bits: int) -> torch.Tensor:
    """Per-element bound on |log2_dequant - log_sqrt2_dequant| (zero for even codes)."""
    err = abs(SQRT2_MINUS_1 - log2_odd_multiplier(frac_bits) / 2 ** frac_bits)
    odd = codes - 2.0 * torch.floor(codes / 2.0)
    return scale * err * odd * torch.exp2(-torch.ceil(codes / 2.0))


def search_log_scale(
    x: torch.Tensor,
    bits: int,
    percentiles: Sequence[float],
    max_elements: int = 1 << 16,
    seed: int = 0,
    sample: Optional[torch.Tensor] = None,
    consumer: Optional[Consumer] = None,
) -> torch.Tensor:
    """Scale of the log-sqrt(2) quantizer: the percentile of ``x`` with the smallest MSE (as ``search_per_tensor``)."""
    candidates = [torch.clamp(hi, min=_EPS) for _, hi in _tensor_candidates(x, percentiles, False, max_elements, seed)]
    if len(candidates) == 1:
        return candidates[0]
    if sample is None:
        sample = _subsample(x.detach().reshape(-1).float(), max_elements, seed)
    target = consumer(sample) if consumer is not None else sample
    best = None
    for scale in candidates:
        err = _error(log_sqrt2_dequant(log_codes(sample, scale, bits), scale, bits), target, consumer)
        if best is None or err < best[0]:
            best = (err, scale)
    return best[1]
