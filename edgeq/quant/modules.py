"""Quantized modules: fake-quant forward in PyTorch, integer tensors exposed for a compiler.

Each wrapper is built either for calibration (``from_float`` with a pending calibration that runs
on its first forward) or empty, to receive saved tensors (``load_quantized``). Calibration is
sequential within one forward pass of the whole calibration batch: a layer calibrates on inputs
that already went through every quantized layer before it.
"""
from __future__ import annotations

from edgeq.errors import UnsupportedModelError

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from edgeq.errors import CalibrationError
from edgeq.models.attention import attention_forward
from edgeq.quant import quantizers as Q
from edgeq.quant import reparam as R
from edgeq.quant.config import QuantConfig


# Range searches that judge the error after the consuming operation evaluate it on this many
# rows of a Linear's input / (batch, head) matrices of a matmul.
OBJECTIVE_ROWS = 1024
OBJECTIVE_SLICES = 64


@dataclass(frozen=True)
class LayerSpec:
    """How one quantizable layer is quantized (everything needed to rebuild it before loading tensors)."""

    name: str
    kind: str                      # "linear" | "conv" | "matmul"
    w_bits: Optional[int]          # None for matmuls
    a_bits: int
    weight_symmetric: bool = False
    act_symmetric: bool = False
    log2: bool = False             # matmul_av: first operand on the log2 quantizer
    log2_frac_bits: int = 8
    norm: Optional[str] = None     # LayerNorm folded into this layer's input (reparameterization)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "name"}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "LayerSpec":
        return cls(name=name, **{k: data[k] for k in cls.__dataclass_fields__ if k != "name" and k in data})


@dataclass
class Calibration:
    """Shared state of one calibration pass."""

    config: QuantConfig
    total: int
    progress: Optional[Callable[[int, int, str], None]] = None
    done: int = 0
    offset: int = 0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def step(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.offset + self.done, self.offset + self.total, name)

    def check_finite(self, x: torch.Tensor, name: str, what: str = "input") -> None:
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"non-finite activations at the {what} of layer {name} during calibration")


class UniformQuantizer(nn.Module):
    """Per-tensor uniform fake quantizer of an activation (scale and zero point as buffers)."""

    def __init__(self, bits: int, symmetric: bool = False):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = Q.int_range(bits, signed=symmetric, symmetric=symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))

    def set(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()).round().to(torch.int32))

    def calibrate(self, x: torch.Tensor, config: QuantConfig, sample: Optional[torch.Tensor] = None,
                  consumer: Optional[Q.Consumer] = None) -> None:
        percentiles = config.percentiles if config.search else (1.0,)
        scale, zp = Q.search_per_tensor(x, self.qmin, self.qmax, self.symmetric, percentiles,
                                        config.max_search_elements, config.seed, sample, consumer)
        self.set(scale, zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Q.fake_quant(x, self.scale, self.zero_point.to(x.dtype), self.qmin, self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return Q.quantize(x, self.scale, self.zero_point.to(x.dtype), self.qmin, self.qmax).to(torch.int32)

    def describe(self) -> dict[str, Any]:
        return {"scheme": "symmetric" if self.symmetric else "asymmetric", "granularity": "per_tensor",
                "bits": self.bits, "qmin": self.qmin, "qmax": self.qmax}

    def export(self) -> dict[str, Any]:
        return {**self.describe(), "scale": self.scale.clone(), "zero_point": self.zero_point.clone()}


class LogQuantizer(nn.Module):
    """Post-Softmax quantizer: calibrated as log-sqrt(2), run as log2 with a fixed-point sqrt(2)."""

    def __init__(self, bits: int, frac_bits: int = 8):
        super().__init__()
        self.bits, self.frac_bits = bits, frac_bits
        self.register_buffer("scale", torch.ones(()))

    def calibrate(self, x: torch.Tensor, config: QuantConfig, sample: Optional[torch.Tensor] = None,
                  consumer: Optional[Q.Consumer] = None) -> None:
        percentiles = config.percentiles if config.search else (1.0,)
        self.scale.copy_(Q.search_log_scale(x, self.bits, percentiles, config.max_search_elements, config.seed,
                                            sample, consumer))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return Q.log_codes(x, self.scale, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Q.log2_dequant(self.codes(x), self.scale, self.bits, self.frac_bits)

    def forward_sqrt2(self, x: torch.Tensor) -> torch.Tensor:
        """The calibration-time log-sqrt(2) reading of the same codes."""
        return Q.log_sqrt2_dequant(self.codes(x), self.scale, self.bits)

    def describe(self) -> dict[str, Any]:
        return {"scheme": "log2", "bits": self.bits, "zero_code": Q.log_zero_code(self.bits),
                "frac_bits": self.frac_bits, "odd_multiplier": Q.log2_odd_multiplier(self.frac_bits)}

    def export(self) -> dict[str, Any]:
        return {**self.describe(), "scale": self.scale.clone()}


@dataclass
class _Pending:
    calibration: Calibration
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    norm: Optional[nn.LayerNorm] = None


class _QuantWeighted(nn.Module):
    """Shared part of QuantLinear and QuantConv2d: int weights per output channel, per-tensor input."""

    def __init__(self, weight_shape: tuple[int, ...], spec: LayerSpec, input_bits: int):
        super().__init__()
        self.spec = spec
        self.w_qmin, self.w_qmax = Q.int_range(spec.w_bits, signed=True, symmetric=spec.weight_symmetric)
        out = weight_shape[0]
        self.register_buffer("weight_int", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out))
        self.input_quant = UniformQuantizer(input_bits, spec.act_symmetric)
        self.float_weight: Optional[torch.Tensor] = None
        self._pending: Optional[_Pending] = None

    @property
    def name(self) -> str:
        return self.spec.name

    def _apply(self, fn, recurse=True):
        # .to(device) moves the reconstruction-only float weight with the buffers
        super()._apply(fn, recurse)
        if self.float_weight is not None:
            self.float_weight = fn(self.float_weight)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_int.dim() - 1)
        zp = self.weight_zero_point.to(torch.float32).view(shape)
        return (self.weight_int.to(torch.float32) - zp) * self.weight_scale.view(shape)

    def _set_weight(self, weight: torch.Tensor, bias: torch.Tensor, config: QuantConfig) -> None:
        percentiles = config.percentiles if config.search else (1.0,)
        scale, zp, qmin, qmax = Q.weight_params(weight, self.spec.w_bits, self.spec.weight_symmetric, percentiles)
        self.weight_int.copy_(Q.quantize_weight(weight, scale, zp, qmin, qmax).to(torch.int8))
        # Kept (outside the state dict) for block reconstruction, which learns the rounding of this
        # exact (reparameterized) float weight; a model loaded from a file has none.
        self.float_weight = weight.detach().clone()
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zp.to(torch.int32))
        self.bias.copy_(bias)

    def _calibrate(self, x: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        cal = pending.calibration
        cal.check_finite(x, self.name)
        if pending.norm is not None:
            x = self._calibrate_folded(x, pending)
        else:
            self.input_quant.calibrate(x, cal.config, *self._input_objective(x, pending.weight, cal.config))
            self._set_weight(pending.weight, pending.bias, cal.config)
        cal.step(self.name)
        return x

    def _input_objective(self, x: torch.Tensor, weight: torch.Tensor, config: QuantConfig):
        """(sample, consumer) for the input range search: error measured after this layer's (float) weights."""
        return None, None

    def _calibrate_folded(self, x: torch.Tensor, pending: _Pending) -> torch.Tensor:
        """Channel-wise input quantization folded into the LayerNorm before (see ``reparam``)."""
        config = pending.calibration.config
        q = self.input_quant
        every_row = x.reshape(-1, x.shape[-1]).float()
        rows = Q.subsample_rows(every_row, config.max_search_rows, config.seed)
        percentiles = config.percentiles if config.search else (1.0,)
        lo, hi = Q.search_per_channel_range(rows, q.qmin, q.qmax, q.symmetric, percentiles, include_zero=False,
                                            extremes=torch.aminmax(every_row, dim=0))
        kappas: list[Optional[float]] = [None] + (list(config.clip_candidates) if config.clip else [])
        weight, bias = pending.weight, pending.bias
        best = None
        if len(kappas) > 1:
            sample = Q.subsample_rows(rows, 1024, config.seed + 1)
            reference = F.linear(sample, weight, bias)
        for kappa in kappas:
            clipped = R.clip_ranges(lo, hi, kappa)
            if kappa is not None and torch.equal(clipped[0], lo) and torch.equal(clipped[1], hi):
                continue  # no channel is wider than this cap: the same as no clipping
            scale, zp = R.channel_params(*clipped, q.qmin, q.qmax, q.symmetric)
            fold = R.make_fold(scale, zp, q.qmin, q.qmax)
            if len(kappas) == 1:
                best = (None, kappa, fold)
                break
            w_f, b_f = R.fold_linear_double(weight, bias, fold)
            self._set_weight(w_f, b_f, config)
            q.set(fold.layer_scale, fold.layer_zero_point)
            out = F.linear(q(R.fold_activation(sample, fold)), self.dequantized_weight(), self.bias)
            err = float((out - reference).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, kappa, fold)
        _, kappa, fold = best
        R.fold_layernorm_(pending.norm, fold)
        w_f, b_f = R.fold_linear_double(weight, bias, fold)
        self._set_weight(w_f, b_f, config)
        q.set(fold.layer_scale, fold.layer_zero_point)
        r1 = fold.r1
        pending.calibration.records[self.name] = {
            "clip_kappa": kappa, "r1_max_over_median": float(r1.max() / r1.median()),
        }
        return R.fold_activation(x, fold).to(x.dtype)

    def export(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind, "w_bits": self.spec.w_bits, "a_bits": self.input_quant.bits,
            "weight_int": self.weight_int.clone(), "weight_scale": self.weight_scale.clone(),
            "weight_zero_point": self.weight_zero_point.clone(),
            "weight_scheme": "symmetric" if self.spec.weight_symmetric else "asymmetric",
            "weight_qmin": self.w_qmin, "weight_qmax": self.w_qmax,
            "bias": self.bias.clone(), "input": self.input_quant.export(), "folded_norm": self.spec.norm,
        }


class QuantLinear(_QuantWeighted):
    def __init__(self, in_features: int, out_features: int, spec: LayerSpec):
        super().__init__((out_features, in_features), spec, spec.a_bits)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerSpec, calibration: Calibration,
                   norm: Optional[nn.LayerNorm] = None) -> "QuantLinear":
        module = cls(linear.in_features, linear.out_features, spec)
        bias = linear.bias.detach().clone() if linear.bias is not None else \
            torch.zeros(linear.out_features, device=linear.weight.device)
        module._pending = _Pending(calibration, linear.weight.detach().clone(), bias, norm)
        return module

    def _input_objective(self, x: torch.Tensor, weight: torch.Tensor, config: QuantConfig):
        rows = Q.subsample_rows(x.reshape(-1, x.shape[-1]).float(), OBJECTIVE_ROWS, config.seed)
        return rows, lambda t: F.linear(t, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            x = self._calibrate(x)
        return F.linear(self.input_quant(x), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.spec.w_bits}, a_bits={self.input_quant.bits}"


class QuantConv2d(_QuantWeighted):
    """The patch-embedding convolution: weights at the plan's bits, input at ``QuantConfig.input_bits``."""

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec, input_bits: int):
        super().__init__(tuple(conv.weight.shape), spec, input_bits)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise UnsupportedModelError(f"{spec.name}: padding mode {conv.padding_mode!r} is not supported")

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec, input_bits: int, calibration: Calibration) -> "QuantConv2d":
        module = cls(conv, spec, input_bits)
        bias = conv.bias.detach().clone() if conv.bias is not None else \
            torch.zeros(conv.out_channels, device=conv.weight.device)
        module._pending = _Pending(calibration, conv.weight.detach().clone(), bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            x = self._calibrate(x)
        return F.conv2d(self.input_quant(x), self.dequantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)

    def export(self) -> dict[str, Any]:
        return {**super().export(), "stride": tuple(self.stride), "padding": tuple(self.padding),
                "dilation": tuple(self.dilation), "groups": self.groups}


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands quantized per tensor (``a`` on the log2 quantizer for softmax·v)."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.a_quant = LogQuantizer(spec.a_bits, spec.log2_frac_bits) if spec.log2 else UniformQuantizer(spec.a_bits, spec.act_symmetric)
        self.b_quant = UniformQuantizer(spec.a_bits, spec.act_symmetric)
        self._pending: Optional[_Pending] = None

    @classmethod
    def for_calibration(cls, spec: LayerSpec, calibration: Calibration) -> "QuantMatMul":
        module = cls(spec)
        module._pending = _Pending(calibration)
        return module

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            cal = pending.calibration
            cal.check_finite(a, self.spec.name, "first operand")
            cal.check_finite(b, self.spec.name, "second operand")
            # Each operand's range is judged by the error of the product, not of the operand: a few
            # large q/k components dominate the attention logits, and clipping them by operand MSE hurts.
            a_s, b_s = _matching_slices(a, b, OBJECTIVE_SLICES, cal.config.seed)
            self.a_quant.calibrate(a, cal.config, a_s, lambda t: t @ b_s)
            a_hat = self.a_quant(a_s)
            self.b_quant.calibrate(b, cal.config, b_s, lambda t: a_hat @ t)
            cal.step(self.spec.name)
        return self.a_quant(a) @ self.b_quant(b)

    def export(self) -> dict[str, Any]:
        return {"kind": "matmul", "a_bits": self.spec.a_bits, "a": self.a_quant.export(), "b": self.b_quant.export()}

    def extra_repr(self) -> str:
        return f"a_bits={self.spec.a_bits}, log2={self.spec.log2}"


def _matching_slices(a: torch.Tensor, b: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same few (batch, head) matrices of both operands of a batched matmul."""
    a3 = a.reshape(-1, *a.shape[-2:]).float()
    b3 = b.expand(*a.shape[:-2], *b.shape[-2:]).reshape(-1, *b.shape[-2:]).float()
    if a3.shape[0] > limit:
        keep = torch.randperm(a3.shape[0], generator=torch.Generator().manual_seed(seed))[:limit].to(a3.device)
        a3, b3 = a3[keep], b3[keep]
    return a3, b3


class QuantViTAttention(Attention):
    """timm ``Attention`` with explicit, quantized ``matmul_qk`` and ``matmul_av`` (never fused)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        return attention_forward(self, x, matmul_qk=self.matmul_qk, matmul_av=self.matmul_av, attn_mask=attn_mask,
                                 is_causal=is_causal)


class QuantWindowAttention(WindowAttention):
    """timm Swin ``WindowAttention`` with quantized matmuls; relative position bias and masks stay float."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_forward(self, x, matmul_qk=self.matmul_qk, matmul_av=self.matmul_av, mask=mask)


QUANT_ATTENTION = {Attention: QuantViTAttention, WindowAttention: QuantWindowAttention}


def swap_attention(module: nn.Module, matmul_qk: QuantMatMul, matmul_av: QuantMatMul) -> None:
    """Turn a timm attention module into its quantized subclass in place (parameters untouched)."""
    module.__class__ = QUANT_ATTENTION[type(module)]
    module.fused_attn = False
    module.matmul_qk = matmul_qk
    module.matmul_av = matmul_av
