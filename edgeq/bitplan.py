"""Bit plans: which weight and activation bit width each quantized layer gets.

File format (JSON, versioned)::

    {"version": 1,
     "default": {"w": 8, "a": 8},
     "layers": {"blocks.3.mlp.fc1": {"w": 4, "a": 8}},
     "provenance": {"method": "lrp", ...}}

Layer keys are module names as ``model.named_modules()`` reports them (plus the
attention-matmul names the quantizer defines). ``provenance`` is free-form and
carried through untouched, so a plan can be audited.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from edgeq.errors import BitPlanError
from edgeq.fileio import atomic_write_json, read_json

FORMAT_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
_SPEC = re.compile(r"^w(\d+)a(\d+)$")



def storage_bits(w_bits: int) -> int:
    """The width the integer kernels store ``w_bits``-bit weights at: packed int4 up to 4 bits, else int8. The
    export applies it once and records the result in the ONNX file (``stored_bits``) for the lowering to read."""
    return 4 if w_bits <= 4 else 8

@dataclass(frozen=True)
class LayerBits:
    w: int
    a: int

    def __post_init__(self) -> None:
        for kind, bits in (("weight", self.w), ("activation", self.a)):
            if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
                raise BitPlanError(f"{kind} bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")

    def to_json(self) -> dict[str, int]:
        return {"w": self.w, "a": self.a}

    @classmethod
    def from_json(cls, value: Any, where: str) -> "LayerBits":
        if not isinstance(value, Mapping) or set(value) - {"w", "a"} or not {"w", "a"} <= set(value):
            raise BitPlanError(f"{where}: expected {{\"w\": bits, \"a\": bits}}, got {value!r}")
        return cls(w=value["w"], a=value["a"])


@dataclass(frozen=True)
class BitPlan:
    default: LayerBits
    layers: dict[str, LayerBits] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, w: int, a: int, **provenance: Any) -> "BitPlan":
        return cls(LayerBits(w, a), {}, dict(provenance))

    @classmethod
    def from_spec(cls, spec: str) -> "BitPlan":
        """``w4a8`` style: one width for every layer."""
        match = _SPEC.match(spec.strip().lower())
        if not match:
            raise BitPlanError(f"bits {spec!r} not understood: write wNaM, e.g. w8a8 or w4a4")
        return cls.uniform(int(match.group(1)), int(match.group(2)), method="uniform", spec=spec)

    def bits_for(self, layer: str) -> LayerBits:
        return self.layers.get(layer, self.default)

    def check_layers(self, known: Iterable[str]) -> None:
        """Refuse a plan that names layers the model does not have, suggesting the closest names."""
        known = list(known)
        unknown = [name for name in self.layers if name not in set(known)]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise BitPlanError(f"bit plan names layer {name!r}{more} that the model does not have{hint}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "default": self.default.to_json(),
            "layers": {name: bits.to_json() for name, bits in sorted(self.layers.items())},
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "bit plan") -> "BitPlan":
        if not isinstance(data, Mapping):
            raise BitPlanError(f"{source}: expected a JSON object")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise BitPlanError(f"{source}: unsupported bit plan version {version!r} (this edgeq reads {FORMAT_VERSION})")
        if "default" not in data:
            raise BitPlanError(f"{source}: missing \"default\" bits")
        layers = data.get("layers", {})
        if not isinstance(layers, Mapping):
            raise BitPlanError(f"{source}: \"layers\" must map layer names to bits")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise BitPlanError(f"{source}: \"provenance\" must be an object")
        return cls(
            default=LayerBits.from_json(data["default"], f"{source}: default"),
            layers={name: LayerBits.from_json(bits, f"{source}: layer {name}") for name, bits in layers.items()},
            provenance=dict(provenance),
        )


def read_plan(path: str | os.PathLike) -> BitPlan:
    return BitPlan.from_json(read_json(path, BitPlanError, "bit plan"), source=str(path))


def write_plan(plan: BitPlan, path: str | os.PathLike) -> Path:
    return atomic_write_json(path, plan.to_json())


def resolve_plan(bits: str | None = None, plan_path: str | os.PathLike | None = None) -> BitPlan:
    """The plan named on a command line: ``--plan FILE`` or ``--bits wNaM`` (not both)."""
    if bits and plan_path:
        raise BitPlanError("give either --bits or --plan, not both")
    if plan_path:
        return read_plan(plan_path)
    return BitPlan.from_spec(bits or "w8a8")
