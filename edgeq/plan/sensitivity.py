"""Measured quantization sensitivity (Mix-QViT): the damage of quantizing one layer alone.

For every quantizable layer and candidate width, that layer alone is quantized
(by the same modules and the same calibration :func:`edgeq.quant.quantize`
uses) while every other layer stays **float**, and the model is run on a
held-out slice of the calibration images. Damage is the mean KL divergence
``KL(p_float || p_quantized)`` of the class distributions (the allocator's
objective), and the top-1 agreement with the float model is recorded beside it.

Why a float baseline rather than W8A8 for the other layers: it isolates the
layer's own damage (no W8A8 noise floor to drown small differences in), and it
makes one capture of the float activations serve every trial: the float model
runs once on the calibration images with hooks, and each (layer, width) trial
calibrates its quantizer on the captured input of that layer (exactly the
input ``quantize`` would calibrate on if the layers before it were float)
instead of running a calibration pass. The range search itself is redone per
width: the best clipping depends on the width.

Trials per layer, with ``W = max(w_bits)`` and ``A = max(a_bits)``:

* Linear: weights ``(w, A)`` for every ``w``, activations ``(W, a)`` for
  every ``a``; the damage of any pair is composed additively,
  ``D(w, a) = max(0, D(w, A) + D(W, a) - D(W, A))``, which needs
  ``|w_bits| + |a_bits| - 1`` trials instead of ``|w_bits| * |a_bits|``.
* the patch-embedding convolution: ``(w, A)`` only: its input is quantized at
  ``QuantConfig.input_bits`` whatever the plan says, so ``D(w, a) = D(w, A)``.
* attention matmuls: one trial per activation width ``a`` (the ``w`` of a
  matmul entry is ``a``).

The held-out slice is ``holdout`` of the calibration images (a seeded choice);
the rest calibrate. Tables are cached in ``<edgeq cache>/sensitivity/``, keyed
by the model's weights, the calibration images, the quantization method and
its options, the candidate widths, the split and :data:`SENSITIVITY_VERSION`,
so a rerun is instant.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeq.bitplan import BitPlan
from edgeq.errors import CalibrationError, PlanningError
from edgeq.fileio import atomic_write_json
from edgeq.plan.allocate import DEFAULT_A_BITS, DEFAULT_W_BITS
from edgeq.plan.latency import parse_width_key, width_key
from edgeq.quant.api import check_calibration_data, expected_input_shape
from edgeq.quant.digest import images_digest, model_digest
from edgeq.quant.config import MIN_CALIBRATION_IMAGES, QuantConfig
from edgeq.quant.convert import check_supported, layer_specs
from edgeq.quant.modules import QUANT_ATTENTION, Calibration, LayerSpec, QuantConv2d, QuantLinear, QuantMatMul, swap_attention

# Bump when what a trial measures changes: cached tables of another version are not reused.
SENSITIVITY_VERSION = 1
DEFAULT_HOLDOUT = 0.5

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SensitivityTable:
    """Measured damage per layer and trial width; ``info`` says how it was measured.

    ``kl[layer][(w, a)]`` and ``agreement[layer][(w, a)]`` hold the trials
    actually run (module docstring); :meth:`damage` composes every candidate pair.
    """

    kinds: dict[str, str]
    kl: dict[str, dict[tuple[int, int], float]]
    agreement: dict[str, dict[tuple[int, int], float]]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def damage(self) -> dict[str, dict[tuple[int, int], float]]:
        """Predicted KL damage of every candidate ``(w, a)`` of every layer (module docstring)."""
        top_w, top_a = max(self.w_bits), max(self.a_bits)
        result: dict[str, dict[tuple[int, int], float]] = {}
        for name, kind in self.kinds.items():
            measured = self.kl[name]
            if kind == "matmul":
                result[name] = {(a, a): measured[(a, a)] for a in self.a_bits}
            elif kind == "conv":
                result[name] = {(w, a): measured[(w, top_a)] for w in self.w_bits for a in self.a_bits}
            else:
                base = measured[(top_w, top_a)]
                result[name] = {
                    (w, a): max(0.0, measured[(w, top_a)] + measured[(top_w, a)] - base)
                    for w in self.w_bits for a in self.a_bits
                }
        return result

    def scores(self) -> dict[str, float]:
        """One number per layer (for plots and provenance): its damage at the lowest candidate widths."""
        low_w, low_a = min(self.w_bits), min(self.a_bits)
        damage = self.damage()
        return {name: table[(low_a, low_a) if self.kinds[name] == "matmul" else (low_w, low_a)]
                for name, table in damage.items()}

    def to_json(self) -> dict[str, Any]:
        layers = {}
        for name, kind in self.kinds.items():
            matmul = kind == "matmul"
            layers[name] = {
                "kind": kind,
                "trials": {width_key(w, a, matmul): {"kl": self.kl[name][(w, a)],
                                                     "top1_agreement": self.agreement[name][(w, a)]}
                           for (w, a) in self.kl[name]},
            }
        return {"version": SENSITIVITY_VERSION, "w_bits": list(self.w_bits), "a_bits": list(self.a_bits),
                "info": self.info, "layers": layers}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SensitivityTable":
        kinds, kl, agreement = {}, {}, {}
        for name, entry in data["layers"].items():
            kinds[name] = entry["kind"]
            matmul = entry["kind"] == "matmul"
            kl[name], agreement[name] = {}, {}
            for key, trial in entry["trials"].items():
                pair = parse_width_key(key, matmul)
                kl[name][pair] = float(trial["kl"])
                agreement[name][pair] = float(trial["top1_agreement"])
        return cls(kinds, kl, agreement, tuple(data["w_bits"]), tuple(data["a_bits"]), dict(data.get("info", {})))


# --------------------------------------------------------------------------- hashing and cache


def _cache_path(key: Mapping[str, Any]):
    from edgeq.data.archive import cache_root

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "sensitivity" / f"{name}.json"


def _read_cached(path, key: Mapping[str, Any]) -> Optional[SensitivityTable]:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != SENSITIVITY_VERSION or data.get("info", {}).get("key") != key:
            return None
        return SensitivityTable.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, PlanningError):
        return None  # a damaged cache entry is measured again and overwritten


# --------------------------------------------------------------------------- the float model, explicit


class _FloatMatMul(nn.Module):
    """``a @ b`` as a module, so the attention matmuls can be hooked and swapped like layers."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def _explicit_float_copy(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` whose attention runs its two matmuls as swappable modules."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    for module in list(work.modules()):
        if type(module) in QUANT_ATTENTION:
            swap_attention(module, _FloatMatMul(), _FloatMatMul())
    return work


def _capture_inputs(work: nn.Module, names: Sequence[str], images: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name in names:
        def hook(module, args, _name=name):
            captured[_name] = tuple(a.detach().clone() for a in args)
        handles.append(work.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            work(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextlib.contextmanager
def _installed(work: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` in place of the submodules of the same names for the block, then restore them."""
    saved = []
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        saved.append((parent, child, getattr(parent, child)))
        setattr(parent, child, module)
    try:
        yield
    finally:
        for parent, child, original in reversed(saved):
            setattr(parent, child, original)


def _quantized_layer(work: nn.Module, spec: LayerSpec, captured: tuple[torch.Tensor, ...],
                     config: QuantConfig) -> dict[str, nn.Module]:
    """The quantized module of one layer, calibrated on its captured float input.

    A Linear whose input is folded into the LayerNorm before it comes with a
    folded copy of that LayerNorm, to be installed with it.
    """
    calibration = Calibration(config=config, total=1)
    with torch.no_grad():
        if spec.kind == "matmul":
            module = QuantMatMul.for_calibration(spec, calibration).to(captured[0].device)
            module(*captured)
            return {spec.name: module}
        original = work.get_submodule(spec.name)
        if spec.kind == "conv":
            module = QuantConv2d.from_float(original, spec, spec.a_bits, calibration).to(captured[0].device)
            module(captured[0])
            return {spec.name: module}
        norm = copy.deepcopy(work.get_submodule(spec.norm)) if spec.norm else None
        module = QuantLinear.from_float(original, spec, calibration, norm).to(captured[0].device)
        module(captured[0])
    return {spec.name: module, **({spec.norm: norm} if norm is not None else {})}


def _gptq_round(work: nn.Module, layer: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """GPTQ rounding of an installed trial layer on the Hessian of its quantized input over ``images``."""
    from edgeq.quant.reconstruct import InputHessian, gptq_round_layer

    with InputHessian(layer) as hessian:
        _logits(work, images, batch_size)
    gptq_round_layer(layer, hessian.value)


def _trials(kind: str, w_bits: Sequence[int], a_bits: Sequence[int]) -> list[tuple[int, int]]:
    top_w, top_a = max(w_bits), max(a_bits)
    if kind == "matmul":
        return [(a, a) for a in a_bits]
    pairs = [(w, top_a) for w in w_bits]
    if kind == "linear":
        pairs += [(top_w, a) for a in a_bits if a != top_a]
    return pairs


def _spec_at(spec: LayerSpec, w: int, a: int) -> LayerSpec:
    if spec.kind == "matmul":
        return replace(spec, a_bits=a)
    if spec.kind == "conv":
        return replace(spec, w_bits=w)  # its input width is QuantConfig.input_bits
    return replace(spec, w_bits=w, a_bits=a)


@torch.no_grad()
def _logits(work: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([work(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def _damage(reference_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    logp = F.log_softmax(logits.double(), dim=-1)
    kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1).mean()
    agreement = (logits.argmax(-1) == reference_logp.argmax(-1)).double().mean()
    return max(0.0, float(kl)), float(agreement)


# --------------------------------------------------------------------------- measuring


def _split(count: int, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < holdout < 1.0:
        raise PlanningError(f"holdout must be a fraction between 0 and 1, got {holdout!r}")
    held = max(1, round(count * holdout))
    if count - held < MIN_CALIBRATION_IMAGES:
        raise CalibrationError(
            f"sensitivity needs at least {MIN_CALIBRATION_IMAGES} calibration images plus a held-out slice "
            f"({holdout:.0%} of them); got {count} images"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    return order[held:].sort().values, order[:held].sort().values


def measure_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: str = "lrp-qvit",
    w_bits: Sequence[int] = DEFAULT_W_BITS,
    a_bits: Sequence[int] = DEFAULT_A_BITS,
    holdout: float = DEFAULT_HOLDOUT,
    batch_size: int = 64,
    cache: bool = True,
    progress: Progress | None = None,
    reconstruct: str = "none",
    device: str | torch.device | None = None,
    **quant_options: Any,
) -> SensitivityTable:
    """Damage of quantizing each layer alone at each candidate width (module docstring).

    ``images``: the calibration batch (N×C×H×W, preprocessed); ``method`` and
    ``quant_options``: as for :func:`edgeq.quant.quantize`, so the trials
    quantize exactly as the final model will be. ``cache``: read and write the
    table under the edgeq cache. ``progress(done, total, layer)`` follows the trials.
    ``reconstruct``: "gptq" rounds each trial's weights with GPTQ on the calibration
    images (the Hessian of the layer's quantized input, with every other layer
    float), so the table measures reconstructed layers; "none" (the default)
    measures round-to-nearest, the cheaper proxy (README: the two rank layers alike).
    ``device``: where the trials run (:func:`edgeq.quant.device.resolve_device`).
    """
    from edgeq.quant.device import resolve_device

    device = resolve_device(device)
    if reconstruct not in ("none", "gptq"):
        raise PlanningError(f"sensitivity trials reconstruct with none or gptq, not {reconstruct!r}")
    check_supported(model)
    config = QuantConfig.for_method(method, **quant_options)
    images = check_calibration_data(images, expected_input_shape(model))
    w_bits = tuple(sorted({int(b) for b in w_bits}))
    a_bits = tuple(sorted({int(b) for b in a_bits}))
    if not w_bits or not a_bits:
        raise PlanningError("w_bits and a_bits must each list at least one width")
    calibrate_idx, held_idx = _split(images.shape[0], holdout)
    key = {
        "version": SENSITIVITY_VERSION, "model_sha256": model_digest(model), "calibration_sha256": images_digest(images),
        "method": method, "config": config.to_json(), "w_bits": list(w_bits), "a_bits": list(a_bits),
        "holdout": holdout,
    }
    if reconstruct != "none":
        key["reconstruct"] = reconstruct
    path = _cache_path(key)
    if cache:
        cached = _read_cached(path, key)
        if cached is not None:
            return cached

    top = BitPlan.uniform(max(w_bits), max(a_bits))
    specs = layer_specs(model, top, config)
    work = _explicit_float_copy(model).to(device)
    calibrate_images = images[calibrate_idx].to(device)
    captured = _capture_inputs(work, list(specs), calibrate_images)
    held = images[held_idx].to(device)
    reference = F.log_softmax(_logits(work, held, batch_size).double(), dim=-1)

    kinds, kl, agreement = {}, {}, {}
    total = sum(len(_trials(spec.kind, w_bits, a_bits)) for spec in specs.values())
    done = 0
    for name, spec in specs.items():
        kinds[name], kl[name], agreement[name] = spec.kind, {}, {}
        for w, a in _trials(spec.kind, w_bits, a_bits):
            modules = _quantized_layer(work, _spec_at(spec, w, a), captured[name], config)
            with _installed(work, modules):
                if reconstruct == "gptq" and spec.kind != "matmul":
                    _gptq_round(work, modules[name], calibrate_images, batch_size)
                kl[name][(w, a)], agreement[name][(w, a)] = _damage(reference, _logits(work, held, batch_size))
            done += 1
            if progress is not None:
                progress(done, total, name)
        del captured[name]  # frees memory as the walk goes on

    info = {
        "key": key, "baseline": "float", "objective": "kl", "calibration_images": int(len(calibrate_idx)),
        "held_out_images": int(len(held_idx)), "trials": total,
    }
    table = SensitivityTable(kinds, kl, agreement, w_bits, a_bits, info)
    for values in table.kl.values():
        if not all(math.isfinite(v) for v in values.values()):
            raise CalibrationError("a sensitivity trial gave non-finite logits")
    if cache:
        atomic_write_json(path, table.to_json())
    return table
