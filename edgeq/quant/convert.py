"""Which layers of a timm ViT / DeiT / Swin are quantized, and turning a float model into a quantized one."""
from __future__ import annotations

from edgeq.errors import UnsupportedModelError

from typing import Iterator, Optional

from timm.layers import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from edgeq.bitplan import BitPlan
from edgeq.quant.config import QuantConfig
from edgeq.quant.modules import (
    QUANT_ATTENTION,
    Calibration,
    LayerSpec,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    swap_attention,
)

MATMUL_QK = "matmul_qk"
MATMUL_AV = "matmul_av"
PATCH_EMBED = "patch_embed.proj"

_ATTENTION_TYPES = tuple(QUANT_ATTENTION) + tuple(QUANT_ATTENTION.values())


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if type(model).__name__ == "QuantizedModel" and isinstance(inner, nn.Module) else model


def check_supported(model: nn.Module) -> None:
    """Refuse models whose structure this quantizer does not understand (TypeError)."""
    model = _unwrap(model)
    if not isinstance(model, (VisionTransformer, SwinTransformer)):
        raise UnsupportedModelError(f"quantization supports timm VisionTransformer (ViT, DeiT) and SwinTransformer models, "
                        f"not {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("ViT attention pooling heads (global_pool='map') are not supported")
    for name, module in model.named_modules():
        kind = type(module)
        if isinstance(module, nn.Conv2d) and name != PATCH_EMBED:
            raise UnsupportedModelError(f"convolution {name} is not supported (only the patch embedding {PATCH_EMBED})")
        if "Attention" in kind.__name__ and kind not in _ATTENTION_TYPES:
            raise UnsupportedModelError(f"attention module {name} ({kind.__name__}) is not supported")
        if kind in (Attention, QUANT_ATTENTION[Attention]) and getattr(module, "gate", None) is not None:
            raise UnsupportedModelError(f"gated attention {name} is not supported")


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names a bit plan may key on, in forward order.

    Every ``nn.Linear`` by module name, ``patch_embed.proj``, and for each attention module ``A``
    the two matmuls ``A.matmul_qk`` (q·kᵀ) and ``A.matmul_av`` (softmax·v), listed between
    ``A.qkv`` and ``A.proj``.
    """
    check_supported(model)
    return [name for name, _ in _walk(_unwrap(model))]


def _walk(model: nn.Module) -> Iterator[tuple[str, str]]:
    """(layer name, kind) in forward order; kind in linear | conv | matmul_qk | matmul_av."""
    attention_prefix: Optional[str] = None
    for name, module in model.named_modules():
        if attention_prefix is not None and not name.startswith(attention_prefix + "."):
            attention_prefix = None
        if isinstance(module, _ATTENTION_TYPES):
            attention_prefix = name
            yield f"{name}.qkv", "linear"
            yield f"{name}.{MATMUL_QK}", "matmul"
            yield f"{name}.{MATMUL_AV}", "matmul"
            yield f"{name}.proj", "linear"
        elif attention_prefix is not None:
            continue
        elif name == PATCH_EMBED:
            yield name, "conv"
        elif isinstance(module, (nn.Linear, QuantLinear)):
            yield name, "linear"


def norm_sites(model: nn.Module) -> dict[str, str]:
    """Linear layer -> the LayerNorm whose output it alone reads (through token moves only).

    These are the post-LayerNorm inputs quantized channel-wise and folded: ``norm1 -> attn.qkv``
    and ``norm2 -> mlp.fc1`` of every ViT/Swin block and ``norm -> reduction`` of Swin patch
    merging. Left out, with per-tensor input quantizers:
    - the classifier head: it reads one pooled token per image, so channel ranges would come
      from N samples each and overfit (Swin W8A8 on 12 images: relative logit error 0.15 on
      other images against 0.02 per-tensor); this also keeps out DeiT-distilled's ``norm``,
      which feeds two heads;
    - Swin blocks whose windows need padding: padded zeros would change meaning after folding.
    """
    sites: dict[str, str] = {}

    def add(consumer: str, norm_name: str) -> None:
        norm = model.get_submodule(norm_name)
        if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None:
            sites[consumer] = norm_name

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        kind = type(module)
        if kind is Block and isinstance(module.attn, _ATTENTION_TYPES):
            add(f"{prefix}attn.qkv", f"{prefix}norm1")
            if isinstance(getattr(module.mlp, "fc1", None), (nn.Linear, QuantLinear)):
                add(f"{prefix}mlp.fc1", f"{prefix}norm2")
        elif kind is SwinTransformerBlock:
            height, width = module.input_resolution
            win_h, win_w = module.window_size
            if height % win_h == 0 and width % win_w == 0:
                add(f"{prefix}attn.qkv", f"{prefix}norm1")
            add(f"{prefix}mlp.fc1", f"{prefix}norm2")
        elif kind is PatchMerging:
            add(f"{prefix}reduction", f"{prefix}norm")
    return sites


def layer_specs(model: nn.Module, plan: BitPlan, config: QuantConfig) -> dict[str, LayerSpec]:
    """The spec of every quantizable layer under ``plan`` and ``config``."""
    sites = norm_sites(model) if config.reparam else {}
    specs = {}
    for name, kind in _walk(model):
        bits = plan.bits_for(name)
        common = dict(name=name, act_symmetric=config.act_symmetric, weight_symmetric=config.weight_symmetric)
        if kind == "matmul":
            log2 = config.log2 and name.endswith(MATMUL_AV)
            specs[name] = LayerSpec(kind="matmul", w_bits=None, a_bits=bits.a, log2=log2,
                                    log2_frac_bits=config.log2_frac_bits, **common)
        elif kind == "conv":
            specs[name] = LayerSpec(kind="conv", w_bits=bits.w, a_bits=config.input_bits, **common)
        else:
            specs[name] = LayerSpec(kind="linear", w_bits=bits.w, a_bits=bits.a, norm=sites.get(name), **common)
    return specs


def convert(model: nn.Module, specs: dict[str, LayerSpec], calibration: Optional[Calibration] = None) -> None:
    """Replace, in place, every layer in ``specs`` by its quantized module.

    With ``calibration`` the modules calibrate on the next forward pass; without, they are empty
    shells waiting for saved tensors.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else None  # new modules start on the CPU: they follow the model
    walked = dict(_walk(model))
    if set(walked) != set(specs):
        missing = sorted(set(walked) - set(specs)) or sorted(set(specs) - set(walked))
        raise ValueError(f"layer specs do not match the model (first difference: {missing[0]})")
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if spec.kind == "matmul":
            continue
        original = getattr(parent, child)
        if spec.kind == "conv":
            new = (QuantConv2d.from_float(original, spec, spec.a_bits, calibration) if calibration
                   else QuantConv2d(original, spec, spec.a_bits))
        else:
            norm = model.get_submodule(spec.norm) if spec.norm else None
            new = (QuantLinear.from_float(original, spec, calibration, norm) if calibration
                   else QuantLinear(original.in_features, original.out_features, spec))
        setattr(parent, child, new)
    for name, module in list(model.named_modules()):
        if type(module) in QUANT_ATTENTION:
            qk, av = specs[f"{name}.{MATMUL_QK}"], specs[f"{name}.{MATMUL_AV}"]
            if calibration:
                swap_attention(module, QuantMatMul.for_calibration(qk, calibration),
                               QuantMatMul.for_calibration(av, calibration))
            else:
                swap_attention(module, QuantMatMul(qk), QuantMatMul(av))
    if device is not None:
        model.to(device)
