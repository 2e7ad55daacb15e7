"""Block reconstruction after calibration: learned weight rounding and activation steps, unit by unit.

Calibration rounds every weight to nearest and picks activation ranges one quantizer at a time. At 4 bits
and below the errors of a block's quantizers add up in ways no single range search sees. Reconstruction
(AdaRound, BRECQ, QDrop) fixes that on the calibration images, one *unit* at a time, in forward order:
the patch embedding, every transformer block (Swin: also every patch merging) and the classifier head.

For unit ``k``:

* inputs: ``x_q``, what the quantized model (units before ``k`` already reconstructed) feeds the unit, and
  ``x_fp``, what the float model feeds it; target: the float unit's output on ``x_fp``;
* learned: per weight element the rounding direction (AdaRound: ``w = s * clamp(floor(W/s) + h(V))``
  with the rectified sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``V`` started
  so that ``h(V)`` is the fractional part, regularizer ``sum(1 - |2h - 1|^beta)`` with ``beta`` annealed
  from 20 to 2 after a warm-up, so every ``h`` ends at 0 or 1), and the step of every uniform activation
  quantizer inside the unit (LSQ: the step is a parameter, rounding passes gradients straight through);
* loss: squared error of the unit's output summed over channels, averaged over tokens and images (BRECQ's
  and QDrop's plain block-output MSE, which both found as good as Fisher weighting on ViTs), plus the
  regularizer;
* QDrop: while optimizing, each element of the unit's input is taken from ``x_fp`` instead of ``x_q``
  with probability ``drop_prob``, and each activation quantizer inside the unit passes each element
  through unquantized with the same probability; the final model quantizes everything.

What stays fixed: weight scales and zero points (per output channel), activation zero points, the
log2 post-Softmax quantizers, biases, and the reparameterized LayerNorms. The result is therefore the
same integer format as calibration gives (int weights within ``[qmin, qmax]``, per-channel weight scales,
per-tensor activation scale and zero point, log2 codes): export and lowering are unchanged. Every hard
weight is ``floor`` or ``floor + 1`` of ``W/s``, so within one step of round-to-nearest.

A unit whose error (hard rounding, everything quantized, on ``x_q``) ends higher than the calibrated
start keeps its calibrated values; the metadata records both errors per unit.

``method="gptq"`` is the fast alternative (GPTQ, Frantar et al. 2023): no optimization loop. Per weight layer of
the unit, in forward order and each seeing the layers before it already rounded, it collects the Hessian of
the layer's squared output error, ``H = X^T X`` over the quantized inputs ``X`` it receives (on ``x_q``), and
rounds the weight one input column at a time to nearest on the fixed per-channel grid, spreading each column's
rounding error over the columns not yet rounded through the Cholesky factor of ``H^-1`` (``1 %`` of the mean
diagonal added as damping). Activation steps stay as calibrated. Codes can move more than one step from
round-to-nearest, but stay on the same grid, so the integer format is the same.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Optional

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from edgeq.errors import CalibrationError, UnsupportedModelError
from edgeq.quant import quantizers as Q
from edgeq.quant.modules import LogQuantizer, UniformQuantizer, _QuantWeighted

RECONSTRUCTION_METHODS = ("none", "adaround", "gptq")
# Choices a caller may give: "auto" reconstructs exactly when some layer has 4 bits or fewer.
RECONSTRUCTION_CHOICES = ("auto",) + RECONSTRUCTION_METHODS
AUTO_MAX_BITS = 4
# With fewer images than this a block's hundreds of thousands of rounding variables fit the calibration
# images rather than the block (and a batch would hold most of the set).
MIN_RECONSTRUCTION_IMAGES = 16
# Bump when what reconstruction computes changes: cached results of another version are not reused.
RECONSTRUCTION_VERSION = 1

_ZETA, _GAMMA = 1.1, -0.1
_UNIT_TYPES = (PatchEmbed, Block, SwinTransformerBlock, PatchMerging)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ReconstructionConfig:
    """Options of one reconstruction run (BRECQ/QDrop's defaults except the two below, set for 2 CPU cores).

    ``iters``: BRECQ runs 20,000 per block; 300 is what 2 shared cores allow. ``weight_lr``: 1e-2, ten
    times BRECQ's, because so few iterations barely move the rounding at 1e-3 (vit-cifar10 W4A4, 256
    images, 300 iterations, 1,000 val images: 84.3 % at 1e-3, 85.3 % at 1e-2; README).
    """

    method: str = "adaround"
    iters: int = 300
    batch_size: int = 32
    weight_lr: float = 1e-2
    step_lr: float = 4e-5
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"unknown reconstruction {self.method!r}; choose one of {', '.join(RECONSTRUCTION_METHODS)}")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("reconstruction iters and batch_size must be at least 1")
        if not 0.0 <= self.drop_prob < 1.0 or not 0.0 <= self.warmup < 1.0:
            raise ValueError("drop_prob and warmup must lie in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ReconstructionConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_reconstruction(choice: Optional[str], plan, iters: Optional[int] = None,
                           seed: int = 0) -> Optional[ReconstructionConfig]:
    """The config for a command-line ``choice`` (auto | none | adaround) and ``plan``; None when off."""
    choice = choice or "none"
    if choice not in RECONSTRUCTION_CHOICES:
        raise ValueError(f"unknown reconstruction {choice!r}; choose one of {', '.join(RECONSTRUCTION_CHOICES)}")
    if choice == "auto":
        low = plan.default.w <= AUTO_MAX_BITS or plan.default.a <= AUTO_MAX_BITS or any(
            b.w <= AUTO_MAX_BITS or b.a <= AUTO_MAX_BITS for b in plan.layers.values())
        choice = "adaround" if low else "none"
    if choice == "none":
        return None
    config = ReconstructionConfig(method=choice, seed=seed)
    return replace(config, iters=iters) if iters is not None else config


def check_reconstruction_images(count: int) -> None:
    if count < MIN_RECONSTRUCTION_IMAGES:
        raise CalibrationError(f"reconstruction needs at least {MIN_RECONSTRUCTION_IMAGES} calibration images, "
                               f"got {count} (give more with --calib-count or a larger recipe)")


# --------------------------------------------------------------------------- units and their inputs


def reconstruction_units(model: nn.Module, layers: list[str]) -> list[tuple[str, list[str]]]:
    """(unit name, its quantized layers) in forward order: the smallest enclosing block, else the layer."""
    units: dict[str, list[str]] = {}
    for layer in layers:
        parts = layer.split(".")
        unit = next((".".join(parts[:i]) for i in range(1, len(parts))
                     if isinstance(model.get_submodule(".".join(parts[:i])), _UNIT_TYPES)), layer)
        units.setdefault(unit, []).append(layer)
    return list(units.items())


class _Stop(Exception):
    """Ends a forward pass once the unit of interest has been seen."""


@torch.no_grad()
def capture_unit(model: nn.Module, unit: str, images: torch.Tensor, batch_size: int,
                 output: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The input (and, with ``output``, the output) of ``model``'s submodule ``unit`` on ``images``."""
    module = model.get_submodule(unit)
    inputs, outputs = [], []

    def before(_m, args, kwargs):
        if len(args) != 1 or any(v is not None and v is not False for v in kwargs.values()):
            raise UnsupportedModelError(f"reconstruction needs {unit} to take one tensor (got extra arguments)")
        inputs.append(args[0].detach())
        if not output:
            raise _Stop

    def after(_m, _args, out):
        outputs.append(out.detach())
        raise _Stop

    handles = [module.register_forward_pre_hook(before, with_kwargs=True)]
    if output:
        handles.append(module.register_forward_hook(after))
    try:
        for batch in images.split(batch_size):
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(inputs), (torch.cat(outputs) if output else None)


def output_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (the last dim), averaged over everything else."""
    return (out - target).pow(2).sum(-1).mean()


@torch.no_grad()
def unit_output_errors(float_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                       batch_size: int = 64) -> dict[str, float]:
    """Per unit: the error of the quantized model's unit output against the float model's, both end to end."""
    names = list(qmodel.metadata["layers"])
    errors = {}
    for unit, _ in reconstruction_units(qmodel.model, names):
        _, reference = capture_unit(float_model, unit, images, batch_size, output=True)
        _, got = capture_unit(qmodel.model, unit, images, batch_size, output=True)
        errors[unit] = float(output_error(got, reference))
    return errors


# --------------------------------------------------------------------------- learnable stand-ins


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Dropping:
    """QDrop's switch: while on, each quantized element is replaced by its float value with probability p."""

    def __init__(self, prob: float, generator: torch.Generator):
        self.prob, self.generator, self.on = prob, generator, False

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        if not self.on or self.prob == 0.0:
            return x_hat
        keep_float = (torch.rand(x.shape, generator=self.generator) < self.prob).to(x.device)
        return torch.where(keep_float, x, x_hat)


class _LearnedStep:
    """An activation quantizer whose step is a parameter (zero point fixed), rounding straight-through."""

    def __init__(self, quantizer: UniformQuantizer, dropping: _Dropping):
        self.quantizer, self.dropping = quantizer, dropping
        self.start = quantizer.scale.detach().clone()
        self.step = nn.Parameter(self.start.clone())
        quantizer.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        step = self.step.clamp(min=1e-8)
        zero = q.zero_point.to(x.dtype)
        x_hat = (torch.clamp(_round_ste(x / step) + zero, q.qmin, q.qmax) - zero) * step
        return self.dropping(x, x_hat)

    def finish(self, keep: bool) -> None:
        del self.quantizer.forward
        with torch.no_grad():
            self.quantizer.scale.copy_(self.step.clamp(min=1e-8) if keep else self.start)


class _StraightThroughLog:
    """The fixed log2 post-Softmax quantizer, passing gradients straight through (and dropped like the rest)."""

    def __init__(self, quantizer: LogQuantizer, dropping: _Dropping):
        self.quantizer, self.dropping = quantizer, dropping
        self.original = type(quantizer).forward
        quantizer.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.original(self.quantizer, x.detach())
        return self.dropping(x, x + (x_hat - x).detach())

    def finish(self, keep: bool) -> None:
        del self.quantizer.forward


class _AdaRoundWeight:
    """Soft rounding of one layer's weight: ``s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)``."""

    def __init__(self, layer: _QuantWeighted):
        if layer.float_weight is None:
            raise CalibrationError(f"reconstruction needs a freshly calibrated model ({layer.name} has no float weight)")
        self.layer = layer
        shape = (-1,) + (1,) * (layer.weight_int.dim() - 1)
        self.scale = layer.weight_scale.view(shape)
        self.zero = layer.weight_zero_point.to(torch.float32).view(shape)
        ratio = layer.float_weight / self.scale
        self.floor = torch.floor(ratio)
        rest = (ratio - self.floor).clamp(1e-4, 1 - 1e-4)
        self.start = layer.weight_int.clone()
        # sigmoid(V) * (zeta - gamma) + gamma == rest
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
        layer.dequantized_weight = self.soft

    def rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return (torch.clamp(codes + self.zero, layer.w_qmin, layer.w_qmax) - self.zero) * self.scale

    def soft(self) -> torch.Tensor:
        return self._dequantize(self.floor + self.rounding())

    def hard_codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).to(self.floor.dtype) + self.zero,
                           self.layer.w_qmin, self.layer.w_qmax)

    def harden(self) -> None:
        """From now on the layer runs the hard rounding (for judging the result)."""
        codes = self.hard_codes().to(torch.int8)
        self.layer.dequantized_weight = lambda: self._dequantize(codes.to(torch.float32) - self.zero)

    def finish(self, keep: bool) -> None:
        del self.layer.dequantized_weight
        self.layer.weight_int.copy_(self.hard_codes().to(torch.int8) if keep else self.start)


# --------------------------------------------------------------------------- GPTQ


def _layer_rows(layer: _QuantWeighted, x: torch.Tensor) -> torch.Tensor:
    """The quantized input of ``layer`` as the rows its weight (flattened per output channel) multiplies."""
    if isinstance(layer, nn.Module) and hasattr(layer, "stride"):  # QuantConv2d: one row per output position
        if getattr(layer, "groups", 1) != 1:
            raise UnsupportedModelError(f"GPTQ rounding of grouped convolution {layer.name} is not supported")
        kernel = tuple(layer.weight_int.shape[2:])
        cols = torch.nn.functional.unfold(x, kernel, dilation=layer.dilation, padding=layer.padding,
                                          stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               qmin: int, qmax: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's rounding of ``weight`` [out, cols] on the grid ``(code - zero) * scale`` (per output channel),
    minimizing ``(W - Q) H (W - Q)^T`` greedily column by column (module doc); the codes, as float."""
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always 0: their weights never matter
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        code = torch.clamp(torch.round(w[:, j] / s) + z, qmin, qmax)
        codes[:, j] = code
        err = (w[:, j] - (code - z) * s) / upper[j, j]
        w[:, j + 1:] -= err[:, None] * upper[j, j + 1:][None, :]
    return codes.to(torch.float32)


class InputHessian:
    """``with InputHessian(layer) as h: <forward passes>`` sums ``X^T X`` of the rows ``layer``'s (quantized) input
    gives its weight (:func:`_layer_rows`) over those passes; ``h.value`` is the sum (None before any)."""

    def __init__(self, layer: _QuantWeighted):
        self.layer, self.value, self._handle = layer, None, None

    def _collect(self, _module, _args, out) -> None:
        rows = _layer_rows(self.layer, out.detach()).to(torch.float64)
        self.value = rows.T @ rows if self.value is None else self.value + rows.T @ rows

    def __enter__(self) -> "InputHessian":
        self._handle = self.layer.input_quant.register_forward_hook(self._collect)
        return self

    def __exit__(self, *_exc) -> None:
        self._handle.remove()


@torch.no_grad()
def gptq_round_layer(layer: _QuantWeighted, hessian: torch.Tensor) -> None:
    """Replace ``layer``'s integer weights by GPTQ's rounding of its float weights under ``hessian`` (same grid)."""
    if layer.float_weight is None:
        raise CalibrationError(f"reconstruction needs a freshly calibrated model ({layer.name} has no float weight)")
    out_channels = layer.weight_int.shape[0]
    codes = gptq_codes(layer.float_weight.reshape(out_channels, -1), hessian, layer.weight_scale,
                       layer.weight_zero_point.to(torch.float32), layer.w_qmin, layer.w_qmax)
    layer.weight_int.copy_(codes.reshape(layer.weight_int.shape).to(torch.int8))


@torch.no_grad()
def _gptq_unit(name: str, unit: nn.Module, x_q: torch.Tensor, target: torch.Tensor, config: ReconstructionConfig,
               tick: Callable[[], None]) -> dict[str, Any]:
    start_error = _unit_error(unit, x_q, target, config.batch_size)
    layers = [m for m in unit.modules() if isinstance(m, _QuantWeighted)]
    starts = [layer.weight_int.clone() for layer in layers]
    for layer in layers:
        with InputHessian(layer) as hessian:
            for xb in x_q.split(config.batch_size):
                unit(xb)
        gptq_round_layer(layer, hessian.value)
        tick()
    final_error = _unit_error(unit, x_q, target, config.batch_size)
    if not math.isfinite(final_error):
        raise CalibrationError(f"reconstruction of {name} stopped: its output became non-finite")
    keep = final_error < start_error
    if not keep:
        for layer, start in zip(layers, starts):
            layer.weight_int.copy_(start)
    flipped = sum(int((layer.weight_int != start).sum()) for layer, start in zip(layers, starts))
    return {"unit": name, "start_error": start_error, "final_error": final_error, "kept": keep,
            "weights_changed": flipped}


# --------------------------------------------------------------------------- the loop


def _unit_error(unit: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        total = sum(float(output_error(unit(xb), tb)) * len(xb)
                    for xb, tb in zip(x.split(batch_size), target.split(batch_size)))
    return total / len(x)


def _reconstruct_unit(name: str, unit: nn.Module, x_q: torch.Tensor, x_fp: torch.Tensor, target: torch.Tensor,
                      config: ReconstructionConfig, generator: torch.Generator,
                      tick: Callable[[], None]) -> dict[str, Any]:
    start_error = _unit_error(unit, x_q, target, config.batch_size)
    dropping = _Dropping(config.drop_prob, generator)
    weights = [_AdaRoundWeight(m) for m in unit.modules() if isinstance(m, _QuantWeighted)]
    steps = [_LearnedStep(m, dropping) for m in unit.modules() if isinstance(m, UniformQuantizer)]
    logs = [_StraightThroughLog(m, dropping) for m in unit.modules() if isinstance(m, LogQuantizer)]
    rounding_opt = torch.optim.Adam([w.v for w in weights], lr=config.weight_lr)
    step_opt = torch.optim.Adam([s.step for s in steps], lr=config.step_lr) if steps else None
    step_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_opt, T_max=config.iters, eta_min=0.0) \
        if step_opt else None
    warm = int(config.warmup * config.iters)
    count = len(x_q)
    batch = min(config.batch_size, count)
    keep = False
    try:
        dropping.on = True
        for it in range(config.iters):
            idx = torch.randint(count, (batch,), generator=generator).to(x_q.device)
            xb = dropping(x_fp[idx], x_q[idx])
            loss = output_error(unit(xb), target[idx])
            if it >= warm:
                progress = (it - warm) / max(1, config.iters - warm)
                beta = config.beta_end + 0.5 * (config.beta_start - config.beta_end) * (1 + math.cos(math.pi * progress))
                loss = loss + config.reg_weight * sum(w.regularizer(beta) for w in weights)
            if not math.isfinite(float(loss.detach())):
                raise CalibrationError(f"reconstruction of {name} stopped: the loss became non-finite at iteration {it}")
            rounding_opt.zero_grad(set_to_none=True)
            if step_opt:
                step_opt.zero_grad(set_to_none=True)
            loss.backward()
            rounding_opt.step()
            if step_opt:
                step_opt.step()
                step_schedule.step()
            tick()
        dropping.on = False
        for w in weights:
            w.harden()
        final_error = _unit_error(unit, x_q, target, config.batch_size)
        if not math.isfinite(final_error):
            raise CalibrationError(f"reconstruction of {name} stopped: its output became non-finite")
        keep = final_error < start_error
    finally:
        for part in (*weights, *steps, *logs):
            part.finish(keep)
    flipped = sum(int((w.layer.weight_int != w.start).sum()) for w in weights)
    return {"unit": name, "start_error": start_error, "final_error": final_error, "kept": keep,
            "weights_changed": flipped if keep else 0}


def reconstruct(float_model: nn.Module, qmodel, images: torch.Tensor, config: ReconstructionConfig,
                progress: Optional[Progress] = None) -> None:
    """Reconstruct ``qmodel`` (a freshly calibrated :class:`QuantizedModel`) in place on ``images``.

    ``float_model``: the float model it was quantized from (targets and float inputs). Adds
    ``metadata["reconstruction"]`` (config, per-unit errors, seconds).
    """
    check_reconstruction_images(int(images.shape[0]))
    started = time.perf_counter()
    float_model = copy.deepcopy(float_model).to(images.device).eval()
    model = qmodel.model.eval()
    units = reconstruction_units(model, list(qmodel.metadata["layers"]))
    generator = torch.Generator().manual_seed(config.seed)
    per_unit = {name: (len(layers) if config.method == "gptq" else config.iters) for name, layers in units}
    total, done = sum(per_unit.values()), 0
    records = []
    for name, _layers in units:
        x_fp, target = capture_unit(float_model, name, images, 64, output=True)
        x_q, _ = capture_unit(model, name, images, 64, output=False)

        def tick(name=name) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, name)

        if config.method == "gptq":
            records.append(_gptq_unit(name, model.get_submodule(name), x_q, target, config, tick))
            continue
        with torch.enable_grad():
            records.append(_reconstruct_unit(name, model.get_submodule(name), x_q, x_fp, target, config,
                                             generator, tick))
    qmodel.metadata["reconstruction"] = {**config.to_json(), "version": RECONSTRUCTION_VERSION,
                                         "images": int(images.shape[0]), "units": records,
                                         "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- cache


def cache_key(model_sha256: str, images_sha256: str, method: str, quant_config: dict, plan: dict,
              config: ReconstructionConfig) -> dict[str, Any]:
    return {"version": RECONSTRUCTION_VERSION, "model_sha256": model_sha256, "calibration_sha256": images_sha256,
            "method": method, "config": quant_config, "plan": plan, "reconstruction": config.to_json()}


def cache_path(key: dict[str, Any]):
    from edgeq.data.archive import cache_root

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "reconstruction" / f"{name}.safetensors"
