"""Budget strings: what a bit plan may cost.

======================  =====================================================
``avg-bits=4``          parameter-weighted mean weight width of the weight
                        layers: ``sum(params * w) / sum(params)``
``weight-bytes=1.5MB``  stored weight size: ``sum(params * w / 8)`` plus one
                        float32 scale per output channel of every weight layer
                        (``scale_bytes`` = 4 per channel, symmetric per-channel
                        quantization, no zero points). Biases, norms and
                        embeddings stay float and are not counted. Units: B,
                        KB, MB, GB (powers of 1000) and KiB, MiB, GiB (powers
                        of 1024), any case; a bare number is bytes.
``bops=1.2G``           bit operations per image: ``sum(MACs * w * a)`` over
                        weight layers plus ``sum(MACs * a * a)`` over attention
                        matmuls. Suffixes K, M, G, T (powers of 1000).
``latency-ms=12``       measured latency: ``base_ms`` plus the per-layer times
                        of a latency table for the chosen widths; optional
                        ``ms`` suffix.
======================  =====================================================

Several budgets are given as a list or joined with commas
(``avg-bits=4,latency-ms=12``); each kind at most once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

from edgeq.errors import PlanningError

AVG_BITS, WEIGHT_BYTES, BOPS, LATENCY_MS = "avg-bits", "weight-bytes", "bops", "latency-ms"
BUDGET_KINDS = (AVG_BITS, WEIGHT_BYTES, BOPS, LATENCY_MS)

_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS = {
    AVG_BITS: {"": 1},
    WEIGHT_BYTES: _BYTE_UNITS,
    BOPS: _COUNT_UNITS,
    LATENCY_MS: {"": 1, "ms": 1},
}
_EXAMPLES = "avg-bits=4, weight-bytes=1.5MB, bops=1.2G or latency-ms=12"
_PATTERN = re.compile(r"^\s*([A-Za-z_-]+)\s*=\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    kind: str
    limit: float
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise PlanningError(f"unknown budget kind {self.kind!r}: use one of {', '.join(BUDGET_KINDS)}")
        if not math.isfinite(self.limit) or self.limit <= 0:
            raise PlanningError(f"budget {self.kind} must be a positive finite number, got {self.limit!r}")

    def __str__(self) -> str:
        return self.text or format_budget(self.kind, self.limit, round_up=False)


def parse_budget(text: str) -> Budget:
    """One budget string, e.g. ``weight-bytes=1.5MB``; anything malformed is a PlanningError."""
    if not isinstance(text, str):
        raise PlanningError(f"budget must be a string like {_EXAMPLES}; got {text!r}")
    match = _PATTERN.match(text)
    if not match:
        raise PlanningError(f"budget {text!r} not understood: write KIND=VALUE, e.g. {_EXAMPLES}")
    kind, number, unit = match.group(1).lower().replace("_", "-"), match.group(2), match.group(3).lower()
    if kind not in BUDGET_KINDS:
        raise PlanningError(f"budget {text!r}: unknown kind {kind!r}; use one of {', '.join(BUDGET_KINDS)}")
    units = _UNITS[kind]
    if unit not in units:
        allowed = ", ".join(u for u in units if u) or "none"
        raise PlanningError(f"budget {text!r}: unit {match.group(3)!r} not understood for {kind} (units: {allowed})")
    value = float(number) * units[unit]
    if not math.isfinite(value) or value <= 0:
        raise PlanningError(f"budget {text!r} must be positive")
    return Budget(kind, value, text.strip())


def parse_budgets(spec: str | Budget | Iterable[str | Budget]) -> list[Budget]:
    """A budget string, comma-separated budgets, a Budget, or a list of either."""
    if isinstance(spec, Budget):
        items: list = [spec]
    elif isinstance(spec, str):
        items = [part for part in re.split(r"[,;]", spec)]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise PlanningError(f"budget must be a string like {_EXAMPLES}; got {spec!r}") from None
    budgets: list[Budget] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise PlanningError(f"empty budget in {spec!r}")
        budget = item if isinstance(item, Budget) else parse_budget(item)
        if any(b.kind == budget.kind for b in budgets):
            raise PlanningError(f"budget {budget.kind} given twice")
        budgets.append(budget)
    if not budgets:
        raise PlanningError(f"no budget given: write e.g. {_EXAMPLES}")
    return budgets


def _ceil(value: float, step: float) -> float:
    """Round up to a multiple of ``step``, forgiving float noise just above a multiple."""
    scaled = value / step
    return math.ceil(scaled - 1e-9 * max(1.0, abs(scaled))) * step


def _trim(number: float, decimals: int) -> str:
    text = f"{number:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_budget(kind: str, value: float, round_up: bool = True) -> str:
    """``kind=value`` in the budget syntax; ``round_up`` rounds up at the printed precision,
    so a minimum printed this way is itself feasible."""
    rnd = _ceil if round_up else (lambda v, step: round(v / step) * step)
    if kind == AVG_BITS:
        return f"{kind}={_trim(rnd(value, 1e-3), 3)}"
    if kind == LATENCY_MS:
        return f"{kind}={_trim(rnd(value, 1e-3), 3)}"
    if kind == WEIGHT_BYTES:
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if value >= size:
                return f"{kind}={_trim(rnd(value / size, 1e-3), 3)}{unit}"
        return f"{kind}={_trim(rnd(value, 1), 0)}B"
    if kind == BOPS:
        for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= size:
                return f"{kind}={_trim(rnd(value / size, 1e-3), 3)}{unit}"
        return f"{kind}={_trim(rnd(value, 1), 0)}"
    raise PlanningError(f"unknown budget kind {kind!r}")
