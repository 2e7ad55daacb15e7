"""Layer-wise Relevance Propagation for timm ViT, DeiT (distilled too) and Swin.

Relevance is computed as "gradient x input" through a *modified* forward pass
whose values equal the model's own but whose backward pass implements
conservative LRP rules for transformers (Ali et al. 2022, "XAI for
Transformers: better explanations through conservative propagation"; the
LayerNorm and attention handling also match AttnLRP, Achtibat et al. 2024,
except that the softmax is treated as constant rather than propagated):

* Linear / Conv2d: epsilon rule. The output keeps its value ``z`` but its
  gradient is scaled by ``z / (z + eps * sign(z))``, so gradient x input at the
  layer input equals ``sum_k a_j w_jk R_k / (z_k + eps)``.
* LayerNorm: the normalisation scale ``sqrt(var + eps)`` is detached (a
  constant), so the layer is linear in its input (mean centering included).
* GELU and other element-wise activations: ``act(x) = x * g(x)`` with the gate
  ``g(x) = act(x) / x`` detached, i.e. relevance passes through unchanged.
* Attention: the softmax probabilities are detached, so relevance flows only
  through the value path ``A @ V`` (none through Q and K).
* Residual additions, token selection, averaging of the two DeiT heads, Swin
  window shifts and patch merging are linear and need no rule: they split or
  gather relevance exactly.

With those rules each block is linear in its input, so the total relevance at
every residual-stream boundary equals the start relevance (the target logit),
less what biases and the epsilon terms absorb. Biases absorb their share by
design of the epsilon rule; timm initialises Linear biases to zero, so a
randomly initialised model conserves almost exactly, a trained one less so.

Layer contribution scores follow LRP-QViT (Ranjan & Savakis, arXiv
2401.11243): the relevance flowing through a layer, here ``sum |R|`` at the
layer's output, normalised over layers per image and averaged over images.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from edgeq.errors import PlanningError
from edgeq.plan.arch import (
    attention_modules,
    eval_mode,
    explicit_attention,
    override_forward,
    quantizable_layers,
    residual_blocks,
)

try:
    from timm.layers import LayerNorm as _TimmLayerNorm, LayerNormFp32 as _TimmLayerNormFp32

    _LAST_DIM_NORMS: tuple[type, ...] = (nn.LayerNorm, _TimmLayerNorm, _TimmLayerNormFp32)
except ImportError:  # pragma: no cover
    _LAST_DIM_NORMS = (nn.LayerNorm,)

_ACTIVATION_NAMES = {"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "ReLU", "Tanh", "Sigmoid", "Mish", "Hardswish"}

DEFAULT_EPS = 1e-6


@dataclass
class RelevanceTrace:
    """Relevance of one batch, per image (every tensor has the batch size as its length).

    ``start``: the target logit of each image, the relevance LRP starts from.
    ``boundaries``: total relevance at the residual stream, in forward order:
    ``"<block>:in"`` for the input of every transformer block and Swin
    patch-merging layer, and ``"<last block>:out"`` for the last block's output.
    ``layers``: ``sum |R|`` at the output of every weight layer and at every
    attention ``A @ V`` product (named ``<attn>.matmul_av``).
    ``layers_signed``: the same without the absolute value.
    ``input``: total relevance at the pixels (patch-embedding biases and
    position embeddings absorb part of it, so it is not expected to conserve).
    """

    start: torch.Tensor
    targets: torch.Tensor
    boundaries: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    layers_signed: dict[str, torch.Tensor] = field(default_factory=dict)
    input: torch.Tensor | None = None

    def conservation_error(self) -> dict[str, torch.Tensor]:
        """Per boundary: |sum R - start| / |start|, per image."""
        scale = self.start.abs().clamp_min(1e-12)
        return {name: (value - self.start).abs() / scale for name, value in self.boundaries.items()}


# --------------------------------------------------------------------------- rules


def _layer_norm_forward(self, x):
    dims = tuple(range(-len(self.normalized_shape), 0))
    centered = x - x.mean(dim=dims, keepdim=True)
    scale = torch.sqrt(x.var(dim=dims, keepdim=True, unbiased=False) + self.eps).detach()
    out = centered / scale
    if self.weight is not None:
        out = out * self.weight
    if self.bias is not None:
        out = out + self.bias
    return out


def _make_gate_forward(original_forward):
    def forward(self, x):
        out = original_forward(x)
        safe = torch.where(x.abs() > 1e-12, x, torch.ones_like(x))
        gate = torch.where(x.abs() > 1e-12, out / safe, torch.full_like(x, 0.5))
        return x * gate.detach()
    return forward


def _epsilon(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Same value as ``z``; gradient scaled by ``z / (z + eps * sign(z))`` (epsilon rule)."""
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    ratio = (z / (z + eps * sign)).detach()
    return z * ratio + (z * (1 - ratio)).detach()


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        cls = type(module)
        if "norm" in cls.__name__.lower() and isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
            if cls in _LAST_DIM_NORMS or isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            raise PlanningError(f"LRP has no rule for {cls.__name__} (module {name!r})")


@contextlib.contextmanager
def lrp_rules(model: nn.Module, eps: float = DEFAULT_EPS, tap=None) -> Iterator[None]:
    """Inside the block, ``model``'s forward pass has LRP's backward pass (values unchanged).

    ``tap(name, tensor)`` (optional) is called with every weight layer's output
    and every attention ``A @ V`` product, the tensors whose relevance makes
    the layer scores.
    """
    attention_modules(model)  # refuses unsupported attention before anything changes
    _check_supported(model)

    def record(kind, name, tensor):
        if kind == "matmul_av" and tap is not None:
            tap(f"{name}.matmul_av", tensor)
        return None

    def weight_hook(name):
        def hook(module, inputs, output):
            output = _epsilon(output, eps)
            if tap is not None:
                tap(name, output)
            return output
        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(explicit_attention(model, detach_softmax=True, record=record))
        for name, module in model.named_modules():
            if type(module) in _LAST_DIM_NORMS:
                stack.enter_context(override_forward(module, _layer_norm_forward))
            elif type(module).__name__ in _ACTIVATION_NAMES:
                stack.enter_context(override_forward(module, _make_gate_forward(module.forward)))
            elif name and isinstance(module, (nn.Linear, nn.Conv2d)):
                stack.callback(module.register_forward_hook(weight_hook(name)).remove)
        yield


# --------------------------------------------------------------------------- relevance


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    batch = logits.shape[0]
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        chosen = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        chosen = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
        if chosen.numel() != batch:
            raise PlanningError(f"target gives {chosen.numel()} classes for {batch} images")
    if (chosen < 0).any() or (chosen >= logits.shape[1]).any():
        raise PlanningError(f"target class out of range for a model with {logits.shape[1]} classes")
    return chosen


def _per_image(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1).sum(dim=1)


def relevance_trace(model: nn.Module, images: torch.Tensor, target=None, eps: float = DEFAULT_EPS) -> RelevanceTrace:
    """LRP relevance of one batch at every block boundary and every quantizable layer.

    ``target``: ``None`` (each image's predicted class), one class index for
    all images, or one per image.
    """
    if images.ndim != 4:
        raise PlanningError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    batch = images.shape[0]
    taps: dict[str, list[torch.Tensor]] = {}
    boundary: dict[str, torch.Tensor] = {}
    blocks = residual_blocks(model)
    handles = []

    def tap(name, tensor):
        taps.setdefault(name, []).append(tensor)

    def pre_hook(name):
        def hook(module, args, kwargs):
            boundary[f"{name}:in"] = args[0] if args else next(iter(kwargs.values()))
        return hook

    for name, module in blocks:
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    if blocks:
        last_name, last = blocks[-1]
        handles.append(last.register_forward_hook(lambda m, i, o: boundary.__setitem__(f"{last_name}:out", o)))

    x = images.detach().clone().requires_grad_(True)
    try:
        with eval_mode(model), lrp_rules(model, eps=eps, tap=tap), torch.enable_grad():
            logits = model(x)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise PlanningError("LRP needs a model that returns one (N, classes) logit tensor")
            targets = _targets(target, logits)
            start = logits.gather(1, targets[:, None]).squeeze(1)
            names = list(boundary) + [f"{n}#{i}" for n, ts in taps.items() for i in range(len(ts))]
            tensors = list(boundary.values()) + [t for ts in taps.values() for t in ts]
            grads = torch.autograd.grad(start.sum(), [x, *tensors], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()

    def relevance(t, g):
        return torch.zeros_like(t) if g is None else (t * g).detach()

    trace = RelevanceTrace(start=start.detach(), targets=targets.detach())
    trace.input = _per_image(relevance(x, grads[0]), batch)
    for name, t, g in zip(names[: len(boundary)], tensors[: len(boundary)], grads[1 : 1 + len(boundary)]):
        trace.boundaries[name] = _per_image(relevance(t, g), batch)
    for key, t, g in zip(names[len(boundary):], tensors[len(boundary):], grads[1 + len(boundary):]):
        name = key.rsplit("#", 1)[0]
        r = relevance(t, g)
        trace.layers[name] = trace.layers.get(name, 0) + _per_image(r.abs(), batch)
        trace.layers_signed[name] = trace.layers_signed.get(name, 0) + _per_image(r, batch)
    return trace


def lrp_scores(
    model: nn.Module,
    images: torch.Tensor,
    target=None,
    *,
    eps: float = DEFAULT_EPS,
    batch_size: int = 16,
    include_matmuls: bool = True,
) -> dict[str, float]:
    """LRP-QViT layer contribution scores, summing to 1.

    For each image, every layer's ``sum |R|`` at its output is divided by the
    sum over layers; the scores are these shares averaged over images. Layers:
    every Linear and Conv2d, plus ``<attn>.matmul_av`` when ``include_matmuls``.
    ``<attn>.matmul_qk`` gets no score: with the softmax held constant no
    relevance flows through Q @ K^T.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise PlanningError("lrp_scores needs a non-empty (N, C, H, W) batch of images")
    if target is not None and not isinstance(target, int):
        target = torch.as_tensor(target).reshape(-1)
    totals: dict[str, float] = {}
    count = 0
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        chunk_target = target if target is None or isinstance(target, int) else target[start : start + batch_size]
        trace = relevance_trace(model, chunk, chunk_target, eps=eps)
        layers = {n: r for n, r in trace.layers.items() if include_matmuls or not n.endswith(".matmul_av")}
        stacked = torch.stack([r.double() for r in layers.values()])  # (layers, batch)
        shares = stacked / stacked.sum(dim=0, keepdim=True).clamp_min(1e-300)
        for name, share in zip(layers, shares):
            totals[name] = totals.get(name, 0.0) + float(share.sum())
        count += chunk.shape[0]
    order = quantizable_layers(model, include_matmuls)
    return {name: totals[name] / count for name in order if name in totals}
