"""What the planners need to know about a timm vision transformer's structure.

Layer naming (the keys of every score dict, cost table and bit plan made here):

* weight layers: every ``nn.Linear`` and ``nn.Conv2d`` under its
  ``model.named_modules()`` name (``patch_embed.proj``, ``blocks.3.attn.qkv``,
  ``layers.1.downsample.reduction``, ``head``, ``head_dist``, ``head.fc`` ...);
* attention matmuls: ``<attention module name>.matmul_qk`` (Q @ K^T) and
  ``<attention module name>.matmul_av`` (softmax(.) @ V). They carry no weight;
  only their activation width matters.

The list of layers itself is the quantizer's
(:func:`edgeq.quant.convert.quantizable_layers`): a plan may name exactly what
``quantize`` quantizes.

Supported attention modules are timm's ``Attention`` (ViT, DeiT, distilled
DeiT) and ``WindowAttention`` (Swin). :func:`attention_forward` runs their
forward pass step by step (never the fused kernel) through the one explicit
forward the quantizer uses too (:mod:`edgeq.models.attention`), so the planners
can see the attention probabilities and the A @ V product, and LRP can detach
the softmax. Its output equals the module's own forward pass (tested).
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from edgeq.errors import PlanningError
from edgeq.models.attention import ATTENTION_TYPES
from edgeq.models.attention import attention_forward as explicit_forward
from edgeq.quant.convert import MATMUL_AV, MATMUL_QK
from edgeq.quant.convert import quantizable_layers as quantizer_layers

from timm.models.swin_transformer import WindowAttention as _SwinWindowAttention

SUPPORTED_ATTENTION = ATTENTION_TYPES
MATMUL_SUFFIXES = (MATMUL_QK, MATMUL_AV)

# Called as record(kind, attention_module_name, tensor) with kind "attn" (softmax
# probabilities, before any detach) or "matmul_av" (the A @ V product).
Recorder = Callable[[str, str, torch.Tensor], Optional[torch.Tensor]]


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the layers that carry quantizable weights: every Linear and Conv2d, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d)) and name]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The supported attention modules by name; refuses a model with attention it does not know.

    A module whose class name mentions attention but is none of the supported
    classes (e.g. an attention-pool head, rotary attention) would be silently
    mishandled by LRP and by the attention-map capture, so it is an error.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module) in SUPPORTED_ATTENTION:
            found[name] = module
        elif "attention" in type(module).__name__.lower() or type(module).__name__.lower().endswith("attn"):
            raise PlanningError(
                f"module {name!r} is a {type(module).__name__}, which the planners do not support "
                "(supported attention: timm Attention as in ViT/DeiT, and Swin WindowAttention)"
            )
    return found


def matmul_layers(model: nn.Module) -> list[str]:
    """``<attn>.matmul_qk`` and ``<attn>.matmul_av`` for every supported attention module."""
    return [f"{name}.{suffix}" for name in attention_modules(model) for suffix in MATMUL_SUFFIXES]


def quantizable_layers(model: nn.Module, include_matmuls: bool = True) -> list[str]:
    """Every layer a bit plan can name, in execution order.

    The quantizer decides what it quantizes, so this is
    :func:`edgeq.quant.convert.quantizable_layers` (which refuses models it
    cannot quantize); without ``include_matmuls`` the attention matmuls are
    left out.
    """
    names = quantizer_layers(model)
    if include_matmuls:
        return names
    return [name for name in names if name.rpartition(".")[2] not in MATMUL_SUFFIXES]


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose input and output live on the residual stream, in forward order.

    Transformer blocks (anything with ``norm1``, ``attn`` and ``mlp``) and Swin
    patch-merging layers. Their inputs are the "block boundaries" at which LRP
    conservation is checked.
    """
    blocks = []
    for name, module in model.named_modules():
        is_block = all(hasattr(module, attr) for attr in ("norm1", "attn", "mlp"))
        is_merge = type(module).__name__ == "PatchMerging"
        if is_block or is_merge:
            blocks.append((name, module))
    return blocks


# --------------------------------------------------------------------------- attention


def attention_forward(module: nn.Module, name: str, x: torch.Tensor, *, detach_softmax: bool = False,
                      record: Recorder | None = None, **kwargs) -> torch.Tensor:
    """The supported attention module's forward pass, written out (no fused kernel): the one explicit forward
    (:func:`edgeq.models.attention.attention_forward`, which the quantizer runs too), with ``record`` told the
    probabilities and the A @ V product, and the probabilities and a gate detached with ``detach_softmax``."""
    if type(module) not in SUPPORTED_ATTENTION:
        raise PlanningError(f"attention module {name!r} of type {type(module).__name__} is not supported")

    def recorded(kind: str, tensor: torch.Tensor) -> torch.Tensor:
        replaced = record(kind, name, tensor) if record is not None else None
        return tensor if replaced is None else replaced

    def detached(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if detach_softmax else tensor

    return explicit_forward(module, x, on_probs=lambda attn: detached(recorded("attn", attn)),
                            on_av=lambda out: recorded("matmul_av", out), on_gate=detached, **kwargs)


@contextlib.contextmanager
def override_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Swap a module's forward for the duration of a ``with`` block (instance attribute, restored after)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


@contextlib.contextmanager
def explicit_attention(model: nn.Module, *, detach_softmax: bool = False,
                       record: Recorder | None = None) -> Iterator[dict[str, nn.Module]]:
    """Run every supported attention module through :func:`attention_forward` inside the block."""
    modules = attention_modules(model)
    with contextlib.ExitStack() as stack:
        for name, module in modules.items():
            def forward(self, x, *args, _name=name, **kwargs):
                if args:  # Swin passes mask by keyword; ViT passes attn_mask by keyword
                    kwargs = dict(zip(("mask",) if type(self) is _SwinWindowAttention else ("attn_mask", "is_causal"), args), **kwargs)
                return attention_forward(self, _name, x, detach_softmax=detach_softmax, record=record, **kwargs)

            stack.enter_context(override_forward(module, forward))
        yield modules


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode inside the block, the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class LayerCost:
    """Size and work of one quantizable layer for one image.

    ``params``: weight elements (bias excluded: biases stay in float).
    ``macs``: multiply-accumulates per image (for a matmul: of Q @ K^T or A @ V).
    ``out_channels``: output channels, i.e. per-channel scales the weight needs.
    ``kind``: ``"linear"``, ``"conv"`` or ``"matmul"``.
    """

    params: int
    macs: int
    out_channels: int = 0
    kind: str = "linear"

    @property
    def has_weight(self) -> bool:
        return self.kind != "matmul"


def _input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise PlanningError("layer_costs needs input_size: the model has no pretrained_cfg['input_size']")
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 4:
        size = size[1:]
    if len(size) != 3:
        raise PlanningError(f"input_size must be (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


def layer_costs(model: nn.Module, input_size=None, include_matmuls: bool = True) -> dict[str, LayerCost]:
    """Parameter and MAC counts per quantizable layer, measured with hooks on one dummy image.

    ``input_size``: ``(C, H, W)`` (a leading batch dimension is ignored); by
    default the model's ``pretrained_cfg["input_size"]``. MACs count only the
    multiply-accumulates of the layer itself (no bias adds, no softmax).
    """
    size = _input_size(model, input_size)
    macs: dict[str, int] = {}
    handles = []

    def weight_hook(name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_out = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_out = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_out
        return hook

    def attention_hook(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            batches, tokens, _ = x.shape
            attn_dim = module.qkv.out_features // 3
            work = batches * tokens * tokens * attn_dim
            for suffix in MATMUL_SUFFIXES:
                key = f"{name}.{suffix}"
                macs[key] = macs.get(key, 0) + work
        return hook

    costs_static: dict[str, tuple[int, int, str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            out_ch = module.out_channels if kind == "conv" else module.out_features
            costs_static[name] = (module.weight.numel(), out_ch, kind)
            handles.append(module.register_forward_hook(weight_hook(name)))
    if include_matmuls:
        for name, module in attention_modules(model).items():
            handles.append(module.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *size), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()

    costs: dict[str, LayerCost] = {}
    for name in quantizable_layers(model, include_matmuls):
        if name in costs_static:
            params, out_ch, kind = costs_static[name]
            costs[name] = LayerCost(params=params, macs=macs.get(name, 0), out_channels=out_ch, kind=kind)
        else:
            costs[name] = LayerCost(params=0, macs=macs.get(name, 0), out_channels=0, kind="matmul")
    return costs
