"""The one explicit forward of timm's attention modules (edgeq.models.attention): the planners' and the
quantizer's rewrites both run it, and with float matmuls each gives the module's own output bit for bit --
including the parts only one of them used to handle (a gated ViT attention's sigmoid gate)."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from edgeq.models.attention import attention_forward
from edgeq.plan.arch import attention_forward as plan_attention_forward
from edgeq.quant.modules import QUANT_ATTENTION, swap_attention


class FloatMatMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def _vit(**kwargs) -> Attention:
    torch.manual_seed(0)
    module = Attention(48, num_heads=4, qkv_bias=True, **kwargs).eval()
    module.fused_attn = False  # timm's own explicit path: the reference
    return module


VIT_CASES = {"plain": {}, "gated": {"gated": True},
             "qk_norm": {"qk_norm": True, "scale_norm": True, "norm_layer": nn.LayerNorm}}


def _swin() -> WindowAttention:
    torch.manual_seed(0)
    module = WindowAttention(32, num_heads=2, window_size=4).eval()
    module.fused_attn = False
    return module


def _runs(module: nn.Module, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The module's own forward, the shared one, the planners' rewrite and the quantizer's class (float matmuls)."""
    quant = copy.deepcopy(module)
    swap_attention(quant, FloatMatMul(), FloatMatMul())
    assert type(quant) is QUANT_ATTENTION[type(module)]
    with torch.no_grad():
        return [module(x, **kwargs), attention_forward(module, x, **kwargs),
                plan_attention_forward(module, "attn", x, **kwargs), quant(x, **kwargs)]


@pytest.mark.parametrize("case", VIT_CASES)
def test_vit_attention_is_written_out_once_and_exactly(case: str) -> None:
    module = _vit(**VIT_CASES[case])
    x = torch.randn(2, 7, 48)
    reference, *rewrites = _runs(module, x)
    for out in rewrites:
        assert torch.equal(out, reference)
    if case == "gated":  # the gate is really applied: without it the output differs
        ungated = copy.deepcopy(module)
        ungated.gate = None
        assert not torch.equal(attention_forward(ungated, x), reference)


def test_vit_attention_masks() -> None:
    module = _vit()
    x = torch.randn(2, 7, 48)
    mask = torch.zeros(7, 7).masked_fill(torch.rand(7, 7) > 0.7, float("-inf")).fill_diagonal_(0)
    for kwargs in ({"attn_mask": mask}, {"is_causal": True}):
        reference, *rewrites = _runs(module, x, **kwargs)
        for out in rewrites:
            assert torch.equal(out, reference)


def test_swin_window_attention_with_and_without_the_shift_mask() -> None:
    module = _swin()
    x = torch.randn(4, 16, 32)  # 2 images x 2 windows of 4 x 4 tokens
    mask = torch.zeros(2, 16, 16)
    mask[1, :8, 8:] = mask[1, 8:, :8] = -100.0
    for kwargs in ({}, {"mask": mask}):
        reference, *rewrites = _runs(module, x, **kwargs)
        for out in rewrites:
            assert torch.equal(out, reference)


def test_planners_see_and_detach_the_probabilities_the_product_and_the_gate() -> None:
    module = _vit(gated=True)
    x = torch.randn(2, 7, 48, requires_grad=True)
    seen = {}

    def record(kind, name, tensor):
        seen[kind] = (name, tuple(tensor.shape), tensor.requires_grad)
        return None

    out = plan_attention_forward(module, "blocks.0.attn", x, detach_softmax=True, record=record)
    assert seen == {"attn": ("blocks.0.attn", (2, 4, 7, 7), True), "matmul_av": ("blocks.0.attn", (2, 4, 7, 12), True)}
    out.sum().backward()  # gradient flows through v and the projections only
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_other_modules_are_refused() -> None:
    with pytest.raises(TypeError, match="not a timm Attention"):
        attention_forward(nn.Linear(4, 4), torch.zeros(1, 2, 4))
