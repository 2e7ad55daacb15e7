"""Measured per-layer latency tables, for ``latency-ms`` budgets.

File format (JSON)::

    {"header": {"version": 1, "model": "edgeq/vit-cifar10", "target": "rpi4",
                "unit": "ms", "base_ms": 0.8},
     "layers": {"blocks.0.attn.qkv":       {"w8a8": 0.21, "w4a8": 0.15, "w4a4": 0.11},
                "blocks.0.attn.matmul_qk": {"a8": 0.05, "a4": 0.03}}}

``header.model`` and ``header.target`` say what was measured; ``base_ms`` is
the time of everything the table does not list (norms, softmax, head
pooling...), added once. Keys are ``wNaM`` for weight layers; attention
matmuls have only an activation width, written ``aN`` (``wNaN`` is accepted
too). Only the measured widths are candidates for a layer. A table for another
model or target, a table missing layers of the model or naming layers it does
not have, or any malformed entry is a :class:`~edgeq.errors.PlanningError`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from edgeq.errors import PlanningError

FORMAT_VERSION = 1
_WA = re.compile(r"^w(\d+)a(\d+)$")
_A = re.compile(r"^a(\d+)$")


def parse_width_key(key: Any, matmul: bool = False) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8); for a matmul ``"a8"`` (or ``"w8a8"``) -> (8, 8)."""
    text = str(key).strip().lower()
    m = _WA.match(text)
    if m:
        w, a = int(m.group(1)), int(m.group(2))
        if matmul and w != a:
            raise PlanningError(f"latency key {key!r}: an attention matmul has one width; write a{a}")
        return w, a
    m = _A.match(text)
    if m and matmul:
        return int(m.group(1)), int(m.group(1))
    raise PlanningError(f"latency key {key!r} not understood: write wNaM" + (" or aN" if matmul else ""))


def width_key(w: int, a: int, matmul: bool = False) -> str:
    return f"a{a}" if matmul else f"w{w}a{a}"


@dataclass(frozen=True)
class LatencyTable:
    model: str
    target: str
    layers: dict[str, dict[tuple[int, int], float]]
    base_ms: float = 0.0
    extra_header: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, source: str = "latency table") -> "LatencyTable":
        if not isinstance(data, Mapping):
            raise PlanningError(f"{source}: expected a JSON object with \"header\" and \"layers\"")
        header = data.get("header")
        if not isinstance(header, Mapping):
            raise PlanningError(f"{source}: missing \"header\" with model and target")
        version = header.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise PlanningError(f"{source}: unsupported latency table version {version!r}")
        model, target = header.get("model"), header.get("target")
        if not isinstance(model, str) or not model:
            raise PlanningError(f"{source}: header has no \"model\"")
        if not isinstance(target, str) or not target:
            raise PlanningError(f"{source}: header has no \"target\"")
        unit = header.get("unit", "ms")
        if unit != "ms":
            raise PlanningError(f"{source}: unit must be \"ms\", got {unit!r}")
        base = header.get("base_ms", 0.0)
        if not _is_time(base, allow_zero=True):
            raise PlanningError(f"{source}: base_ms must be a non-negative number, got {base!r}")
        layers_in = data.get("layers")
        if not isinstance(layers_in, Mapping) or not layers_in:
            raise PlanningError(f"{source}: \"layers\" must map layer names to {{\"wNaM\": ms}}")
        layers: dict[str, dict[tuple[int, int], float]] = {}
        for name, entries in layers_in.items():
            if not isinstance(entries, Mapping) or not entries:
                raise PlanningError(f"{source}: layer {name!r} needs {{\"wNaM\": ms, ...}}")
            matmul = str(name).rsplit(".", 1)[-1].startswith("matmul_")
            table: dict[tuple[int, int], float] = {}
            for key, ms in entries.items():
                widths = parse_width_key(key, matmul)
                if not _is_time(ms):
                    raise PlanningError(f"{source}: layer {name!r} {key}: time must be a positive number, got {ms!r}")
                table[widths] = float(ms)
            layers[str(name)] = table
        extra = {k: v for k, v in header.items() if k not in {"version", "model", "target", "unit", "base_ms"}}
        return cls(model=model, target=target, layers=layers, base_ms=float(base), extra_header=extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        from edgeq.fileio import read_json

        return cls.from_json(read_json(path, PlanningError, "latency table"), source=str(path))

    def to_json(self) -> dict[str, Any]:
        return {
            "header": {"version": FORMAT_VERSION, "model": self.model, "target": self.target, "unit": "ms",
                       "base_ms": self.base_ms, **self.extra_header},
            "layers": {
                name: {width_key(w, a, name.rsplit(".", 1)[-1].startswith("matmul_")): ms
                       for (w, a), ms in sorted(entries.items(), reverse=True)}
                for name, entries in self.layers.items()
            },
        }

    def write(self, path: str | os.PathLike) -> Path:
        from edgeq.fileio import atomic_write_json

        return atomic_write_json(path, self.to_json())

    def check(self, model: str | None = None, target: str | None = None, layers: Iterable[str] | None = None) -> None:
        """Refuse a table measured for another model or target, or not covering exactly ``layers``."""
        if model is not None and model != self.model:
            raise PlanningError(f"latency table is for model {self.model!r}, not {model!r}")
        if target is not None and target != self.target:
            raise PlanningError(f"latency table was measured on target {self.target!r}, not {target!r}")
        if layers is not None:
            layers = list(layers)
            missing = [name for name in layers if name not in self.layers]
            extra = [name for name in self.layers if name not in set(layers)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise PlanningError(
                    f"latency table for {self.model!r} on {self.target!r} has no times for layer {missing[0]!r}{more}"
                )
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise PlanningError(
                    f"latency table names layer {extra[0]!r}{more} that the model being planned does not have"
                )

    def ms(self, layer: str, w: int, a: int) -> float:
        try:
            return self.layers[layer][(w, a)]
        except KeyError:
            raise PlanningError(f"latency table has no time for {layer!r} at w{w}a{a}") from None


def _is_time(value: Any, allow_zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (value >= 0 if allow_zero else value > 0)


def load_latency_table(source: "LatencyTable | str | os.PathLike | Mapping") -> LatencyTable:
    if isinstance(source, LatencyTable):
        return source
    if isinstance(source, Mapping):
        return LatencyTable.from_json(source)
    return LatencyTable.load(source)
