"""One explicit float forward of timm's attention modules, shared by planning and quantization.

timm's ``Attention`` (ViT, DeiT) and Swin's ``WindowAttention`` may run a fused kernel
(``scaled_dot_product_attention``) that hides the attention probabilities and the two matmuls. The planners need
to see (and for LRP detach) the probabilities and the A @ V product, and the quantizer needs its own modules in
place of the two matmuls, so both run :func:`attention_forward`: timm's non-fused path written out once, with

- ``matmul_qk(q * scale, k^T)`` and ``matmul_av(probs, v)`` (``torch.matmul`` unless given: the quantizer passes
  its :class:`~edgeq.quant.modules.QuantMatMul` modules),
- ``on_probs(probs)``, ``on_av(out)`` and ``on_gate(gate)``: what the caller does with the softmax probabilities
  (after ``attn_drop``), the A @ V product and a gated ViT attention's sigmoid gate; each returns the tensor to go
  on with (the planners record and detach there).

With none of these given its output equals the module's own forward pass, bit for bit (tested).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

__all__ = ["attention_forward", "ATTENTION_TYPES"]

#: the attention modules :func:`attention_forward` writes out (and their subclasses)
ATTENTION_TYPES = (Attention, WindowAttention)

Step = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def attention_forward(module: nn.Module, x: torch.Tensor, *, matmul_qk: Callable = torch.matmul,
                      matmul_av: Callable = torch.matmul, on_probs: Step = None, on_av: Step = None,
                      on_gate: Step = None, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module``'s forward pass on ``x`` written out (module doc); ``attn_mask``/``is_causal`` are ViT
    attention's arguments, ``mask`` Swin's (the shifted windows' 0/-inf mask)."""
    on_probs, on_av, on_gate = on_probs or _keep, on_av or _keep, on_gate or _keep
    swin = isinstance(module, WindowAttention)
    if not swin and not isinstance(module, Attention):
        raise TypeError(f"{type(module).__name__} is not a timm Attention or WindowAttention")
    B, N, _ = x.shape
    gate_layer = None if swin else getattr(module, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    head_dim = -1 if swin else module.head_dim
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if not swin:
        q, k = module.q_norm(q), module.k_norm(k)
    scores = matmul_qk(q * module.scale, k.transpose(-2, -1))
    if swin:
        scores = scores + module._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, module.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, module.num_heads, N, N)
    elif attn_mask is not None or is_causal:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
    probs = on_probs(module.attn_drop(scores.softmax(dim=-1)))
    out = on_av(matmul_av(probs, v)).transpose(1, 2)
    if swin:
        return module.proj_drop(module.proj(out.reshape(B, N, -1)))
    out = module.norm(out.reshape(B, N, module.attn_dim))
    if gate is not None:
        out = out * on_gate(gate)
    return module.proj_drop(module.proj(out))
