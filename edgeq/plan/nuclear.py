"""Nuclear-norm sensitivity and the attention ranking loss (Liu et al., NeurIPS 2021,
"Post-Training Quantization for Vision Transformer").

Liu et al. rank layers for mixed precision by the nuclear norm (sum of
singular values) of what they produce: the attention map for the layers of a
multi-head self-attention (MSA) module, the output feature for the others. A
layer whose output has a larger nuclear norm is taken to be more sensitive, and
they weigh each layer's quantization perturbation by it. Here that norm is the
layer's score; :func:`edgeq.plan.allocate.allocate` with the default "noise"
benefit then minimises ``sum score_l * 4**-bits_l``, the same
nuclear-norm-weighted perturbation with a bit-width noise model in place of a
measured one.

Scores, per image, averaged over images:

* weight layers outside attention (``fc1``, ``fc2``, patch embedding, head,
  patch-merging reduction): nuclear norm of the output feature seen as a
  ``tokens x channels`` matrix (a head's output is one row, so its L2 norm);
* ``qkv``, ``proj``, ``matmul_qk``, ``matmul_av`` of an attention module
  (``msa_source="attention"``, the paper's choice): nuclear norm of the
  ``tokens x tokens`` attention probability map, averaged over heads (and over
  windows for Swin). With ``msa_source="output"`` they too use their own
  output feature (``matmul_qk``: the map; ``matmul_av``: the A @ V product).

The two kinds of norm live on different scales (an attention map's nuclear
norm lies between 1 and its token count; a feature's grows with its width and
activation size), so scores mix scales as in the paper's heuristic; they are
normalised to sum to 1 for the allocator.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from edgeq.errors import PlanningError
from edgeq.plan.arch import attention_modules, eval_mode, explicit_attention, quantizable_layers


def nuclear_norm(matrices: torch.Tensor) -> torch.Tensor:
    """Nuclear norm over the last two dimensions, in float64.

    Computed from the eigenvalues of the smaller Gram matrix (singular values
    are their square roots): torch's CPU SVD was 10-100x slower here. Singular
    values below about 1e-8 of the largest are lost to rounding, which does not
    matter for a sum.
    """
    m = matrices.double()
    if m.shape[-2] > m.shape[-1]:
        m = m.mT
    gram = m @ m.mT
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(dim=-1)


def _nuclear_per_image(t: torch.Tensor, batch: int, channels_first: bool = False) -> torch.Tensor:
    """Nuclear norm of each image's ``tokens x channels`` matrix (batch-major rows)."""
    if channels_first:  # conv output (B, C, H, W): rows are spatial positions
        t = t.flatten(2).transpose(1, 2)
    return nuclear_norm(t.reshape(batch, -1, t.shape[-1]))


def _attention_map_norm(attn: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean nuclear norm over heads (and windows) of each image's attention maps."""
    norms = nuclear_norm(attn)  # (B * windows, heads)
    return norms.reshape(batch, -1).mean(dim=1)


def nuclear_scores(
    model: nn.Module,
    images: torch.Tensor,
    *,
    msa_source: Literal["attention", "output"] = "attention",
    include_matmuls: bool = True,
    batch_size: int = 16,
    normalize: bool = True,
) -> dict[str, float]:
    """Nuclear-norm sensitivity per quantizable layer (see the module docstring).

    Returns every Linear and Conv2d and, with ``include_matmuls``, every
    ``<attn>.matmul_qk`` and ``<attn>.matmul_av``; the scores sum to 1 when
    ``normalize`` (the default), else they are the raw averaged norms.
    """
    if msa_source not in ("attention", "output"):
        raise PlanningError(f"msa_source must be 'attention' or 'output', got {msa_source!r}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise PlanningError("nuclear_scores needs a non-empty (N, C, H, W) batch of images")
    attn_names = attention_modules(model)
    owner: dict[str, str] = {}  # weight layer -> its attention module
    for attn_name, module in attn_names.items():
        for child_name, child in module.named_modules():
            if child_name and isinstance(child, (nn.Linear, nn.Conv2d)):
                owner[f"{attn_name}.{child_name}"] = attn_name

    sums: dict[str, float] = {}
    batch_now = 0

    def add(name: str, values: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + float(values.sum())

    def weight_hook(name):
        def hook(module, inputs, output):
            if msa_source == "attention" and name in owner:
                return
            add(name, _nuclear_per_image(output, batch_now, channels_first=isinstance(module, nn.Conv2d)))
        return hook

    def record(kind, attn_name, tensor):
        if kind == "attn":
            value = _attention_map_norm(tensor, batch_now)
            if msa_source == "attention":
                for child, parent in owner.items():
                    if parent == attn_name:
                        add(child, value)
            if include_matmuls:
                add(f"{attn_name}.matmul_qk", value)
                if msa_source == "attention":
                    add(f"{attn_name}.matmul_av", value)
        elif kind == "matmul_av" and include_matmuls and msa_source == "output":
            heads_last = tensor.transpose(1, 2).flatten(2)  # (B*windows, tokens, heads*dim)
            add(f"{attn_name}.matmul_av", _nuclear_per_image(heads_last, batch_now))
        return None

    handles = [
        module.register_forward_hook(weight_hook(name))
        for name, module in model.named_modules()
        if name and isinstance(module, (nn.Linear, nn.Conv2d))
    ]
    count = 0
    try:
        with eval_mode(model), explicit_attention(model, record=record), torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                chunk = images[start : start + batch_size]
                batch_now = chunk.shape[0]
                model(chunk)
                count += batch_now
    finally:
        for handle in handles:
            handle.remove()

    order = quantizable_layers(model, include_matmuls)
    scores = {name: sums[name] / count for name in order if name in sums}
    if normalize:
        total = sum(scores.values())
        if total > 0:
            scores = {name: value / total for name, value in scores.items()}
    return scores


def attention_ranking_loss(
    float_attn: torch.Tensor,
    quant_attn: torch.Tensor,
    margin: float = 0.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Pairwise ranking loss between float and quantized attention scores (Liu et al. 2021, eq. 8).

    For every row (all leading dimensions: batch, head, query token) and every
    pair of keys ``i < j`` along the last dimension::

        hinge(margin - (q_i - q_j) * sign(f_i - f_j)),   hinge(p) = max(p, 0)

    where ``f`` is the float and ``q`` the quantized attention. It penalises a
    quantized map whose order of scores differs from the float one, or keeps a
    gap smaller than ``margin``. Pairs the float map ties (``f_i == f_j``) have
    no order to keep and are skipped (the paper's formula would add a constant
    ``margin`` for each, with no gradient). ``reduction="mean"`` divides by the
    number of ordered pairs counted.
    """
    if float_attn.shape != quant_attn.shape:
        raise ValueError(f"attention shapes differ: {tuple(float_attn.shape)} vs {tuple(quant_attn.shape)}")
    if float_attn.ndim < 1:
        raise ValueError("attention scores need at least one dimension")
    n = float_attn.shape[-1]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=float_attn.device), diagonal=1)
    order = torch.sign(float_attn.unsqueeze(-1) - float_attn.unsqueeze(-2)).detach()  # (..., i, j)
    gap = quant_attn.unsqueeze(-1) - quant_attn.unsqueeze(-2)
    counted = upper & (order != 0)
    loss = torch.clamp(margin - gap * order, min=0) * counted
    total = loss.sum()
    if reduction == "mean":
        return total / counted.sum().clamp_min(1)
    if reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return total
