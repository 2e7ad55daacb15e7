"""The quantized model :func:`edgeq.quant.quantize` returns and ``q.safetensors`` stores (:mod:`edgeq.quant.io`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeq.quant.modules import LayerSpec

FORMAT = "edgeq.quantized"
FORMAT_VERSION = 1

__all__ = ["FORMAT", "FORMAT_VERSION", "QuantizedModel"]


class QuantizedModel(nn.Module):
    """A quantized model: ``forward`` runs it in PyTorch (fake quantization), ``export`` gives the integers.

    ``model`` is the converted timm model; ``metadata`` the JSON-able record that ``save_quantized``
    stores. ``layers`` maps each quantizable layer name to its quantized module.
    """

    def __init__(self, model: nn.Module, metadata: dict[str, Any]):
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def layers(self) -> dict[str, nn.Module]:
        names = set(self.metadata["layers"])
        return {name: m for name, m in self.model.named_modules() if name in names}

    def export(self) -> dict[str, Any]:
        """Per layer, what a compiler needs; plus the folded LayerNorms.

        ``layers[name]`` for a Linear/conv: ``weight_int`` (int8, values within
        ``[weight_qmin, weight_qmax]``), ``weight_scale`` and ``weight_zero_point`` per output
        channel, float ``bias`` (already including the reparameterization), and ``input`` (the
        per-tensor activation quantizer: scale, zero_point, qmin, qmax, bits). For a matmul:
        ``a`` and ``b`` operand quantizers (``a`` of ``matmul_av`` is the log2 quantizer:
        scale, bits, zero_code, frac_bits, odd_multiplier). ``norms[name]`` holds the
        reparameterized LayerNorm affine (``weight``, ``bias``, ``eps``) and the layer it feeds.
        """
        layers = {name: module.export() for name, module in self.layers.items()}
        norms = {}
        for name, spec in self.metadata["layers"].items():
            if spec.get("norm"):
                norm = self.model.get_submodule(spec["norm"])
                norms[spec["norm"]] = {"weight": norm.weight.detach().clone(), "bias": norm.bias.detach().clone(),
                                       "eps": norm.eps, "feeds": name}
        return {"layers": layers, "norms": norms}

    @property
    def specs(self) -> dict[str, LayerSpec]:
        return {name: LayerSpec.from_json(name, data) for name, data in self.metadata["layers"].items()}
