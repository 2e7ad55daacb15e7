"""Bit allocation as an integer linear program (``scipy.optimize.milp``).

Every layer in ``costs`` gets exactly one candidate width pair ``(w, a)``:
``w`` from ``w_bits`` and ``a`` from ``a_bits`` for a weight layer; for an
attention matmul (no weight) only ``a`` varies and the plan records ``w = a``
(both of its operands are activations; the quantizer ignores ``w`` there).

Objective, one of:

* ``scores`` (per-layer importance, e.g. LRP or nuclear norm): maximise
  ``sum_l score_l * (benefit(w_l) + benefit(a_l))`` (matmuls: ``benefit(a_l)``).
  ``benefit="noise"`` (default) is ``-4**(2 - bits)``, minus the relative
  quantization noise power, so the program minimises score-weighted noise
  (a concave benefit: the step from 2 to 3 bits is worth far more than 6 to 8);
  ``benefit="linear"`` is ``bits`` itself; a callable ``bits -> float`` also works.
* ``damage`` (predicted loss increase, e.g. measured sensitivity):
  minimise ``sum_l damage[l][choice_l]``. ``damage[l]`` maps a width to a
  number; keys are ``(w, a)`` tuples, ``"wNaM"`` strings, :class:`LayerBits`,
  or plain ``w`` ints (then the layer's activation width stays at the highest
  of ``a_bits``; for a matmul a plain int is its activation width). Only the
  widths a layer's table lists are candidates for it.

Layers of ``costs`` with no score (or no damage entry) are held at the highest
candidate widths and still charged to the budgets; the plan's provenance lists
them. Ties are broken towards more bits.

Budgets (:mod:`edgeq.plan.budget`) are linear constraints. A budget below what
any plan can reach raises :class:`BudgetInfeasibleError` naming the smallest
feasible value (rounded up at the printed precision, so that value works);
budgets each reachable but not together name, for each, its minimum given the
others. Constraints hold to a relative tolerance of 1e-7 (the solver's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from edgeq.bitplan import MAX_BITS, MIN_BITS, BitPlan, LayerBits
from edgeq.errors import BudgetInfeasibleError, PlanningError
from edgeq.plan.arch import LayerCost
from edgeq.plan.budget import (
    AVG_BITS,
    BOPS,
    LATENCY_MS,
    WEIGHT_BYTES,
    Budget,
    format_budget,
    parse_budget,
    parse_budgets,
)
from edgeq.plan.latency import LatencyTable, load_latency_table

__all__ = [
    "DEFAULT_W_BITS", "DEFAULT_A_BITS", "SCALE_BYTES", "AllocationOptions", "Budget", "parse_budget",
    "parse_budgets", "format_budget", "allocate", "plan_metrics", "benefit_function",
]

DEFAULT_W_BITS = (2, 3, 4, 6, 8)
DEFAULT_A_BITS = (4, 6, 8)
SCALE_BYTES = 4  # one float32 scale per output channel of a weight layer
_TOLERANCE = 1e-7


@dataclass(frozen=True)
class AllocationOptions:
    """What every planner hands to :func:`allocate` besides the objective and the budgets.

    ``w_bits``/``a_bits``: candidate widths. ``benefit``: how a score turns into
    an objective (module docstring). ``latency``: a table (or its file) for
    ``latency-ms`` budgets, checked against ``model_name`` and ``target`` when
    they are given. ``scale_bytes``: bytes per output-channel scale in
    ``weight-bytes``.
    """

    w_bits: Sequence[int] = DEFAULT_W_BITS
    a_bits: Sequence[int] = DEFAULT_A_BITS
    benefit: str | Callable[[int], float] = "noise"
    latency: LatencyTable | str | Mapping | None = None
    model_name: str | None = None
    target: str | None = None
    scale_bytes: float = SCALE_BYTES

    @classmethod
    def merged(cls, options: "AllocationOptions | None" = None, **overrides: Any) -> "AllocationOptions":
        """``options`` (or the defaults) with ``overrides`` (field names of this class) replaced."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown allocation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(options or cls(), **overrides)


def benefit_function(benefit: str | Callable[[int], float]) -> Callable[[int], float]:
    if callable(benefit):
        return benefit
    if benefit == "noise":
        return lambda bits: -(4.0 ** (2 - bits))
    if benefit == "linear":
        return lambda bits: float(bits)
    raise PlanningError(f"unknown benefit {benefit!r}: use 'noise', 'linear' or a function of the bit width")


# --------------------------------------------------------------------------- costs of a choice


def _metric(kind: str, name: str, cost: LayerCost, w: int, a: int, latency: LatencyTable | None,
            scale_bytes: float) -> float:
    """What choosing ``(w, a)`` for one layer adds to a budget's total (before averaging)."""
    if kind == AVG_BITS:
        return float(cost.params * w) if cost.has_weight else 0.0
    if kind == WEIGHT_BYTES:
        return cost.params * w / 8.0 + cost.out_channels * scale_bytes if cost.has_weight else 0.0
    if kind == BOPS:
        return float(cost.macs * w * a) if cost.has_weight else float(cost.macs * a * a)
    if kind == LATENCY_MS:
        if latency is None:
            raise PlanningError("a latency-ms budget needs a latency table")
        return latency.ms(name, w, a)
    raise PlanningError(f"unknown budget kind {kind!r}")


def _offset_and_scale(kind: str, costs: Mapping[str, LayerCost], latency: LatencyTable | None) -> tuple[float, float]:
    """The budget's value is ``offset + sum(metric) / scale``."""
    if kind == AVG_BITS:
        total = sum(c.params for c in costs.values() if c.has_weight)
        if total <= 0:
            raise PlanningError("an avg-bits budget needs at least one weight layer")
        return 0.0, float(total)
    if kind == LATENCY_MS:
        return (latency.base_ms if latency is not None else 0.0), 1.0
    return 0.0, 1.0


def plan_metrics(
    plan: BitPlan,
    costs: Mapping[str, LayerCost],
    latency: LatencyTable | str | None = None,
    scale_bytes: float = SCALE_BYTES,
) -> dict[str, float]:
    """Every budget quantity of ``plan`` over the layers of ``costs`` (latency only with a table)."""
    table = load_latency_table(latency) if latency is not None else None
    kinds = [AVG_BITS, WEIGHT_BYTES, BOPS] + ([LATENCY_MS] if table is not None else [])
    result = {}
    for kind in kinds:
        if kind == AVG_BITS and not any(c.has_weight for c in costs.values()):
            continue
        offset, scale = _offset_and_scale(kind, costs, table)
        total = 0.0
        for name, cost in costs.items():
            bits = plan.bits_for(name)
            w = bits.w if cost.has_weight else bits.a
            total += _metric(kind, name, cost, w, bits.a, table, scale_bytes)
        result[kind] = offset + total / scale
    return result


# --------------------------------------------------------------------------- candidates and objective


def _normalise_damage_key(key: Any, matmul: bool, top_a: int) -> tuple[int, int]:
    if isinstance(key, LayerBits):
        w, a = key.w, key.a
    elif isinstance(key, (tuple, list)) and len(key) == 2:
        w, a = int(key[0]), int(key[1])
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        w, a = (int(key), int(key)) if matmul else (int(key), top_a)
    elif isinstance(key, str):
        text = key.strip().lower()
        if text.isdigit():
            return _normalise_damage_key(int(text), matmul, top_a)
        from edgeq.plan.latency import parse_width_key

        w, a = parse_width_key(text, matmul)
    else:
        raise PlanningError(f"damage table key {key!r} not understood: use w bits, (w, a) or 'wNaM'")
    if matmul:
        w = a
    return w, a


@dataclass
class _Problem:
    names: list[str]
    choices: list[list[tuple[int, int]]]
    objective: list[list[float]]
    held: list[str]


def _candidates(name: str, cost: LayerCost, w_bits: Sequence[int], a_bits: Sequence[int],
                latency: LatencyTable | None) -> list[tuple[int, int]]:
    if cost.has_weight:
        pairs = [(w, a) for w in w_bits for a in a_bits]
    else:
        pairs = [(a, a) for a in a_bits]
    if latency is not None and name in latency.layers:
        pairs = [p for p in pairs if p in latency.layers[name]]
        if not pairs:
            raise PlanningError(
                f"latency table has no time for layer {name!r} at any candidate width "
                f"(w in {list(w_bits)}, a in {list(a_bits)})"
            )
    return pairs


def _build_problem(costs, scores, damage, w_bits, a_bits, benefit, latency) -> _Problem:
    top_a = max(a_bits)
    gain = benefit_function(benefit) if scores is not None else None
    names, choices, objective, held = [], [], [], []
    for name, cost in costs.items():
        pairs = _candidates(name, cost, w_bits, a_bits, latency)
        entry = scores.get(name) if scores is not None else damage.get(name)
        if entry is None:  # unscored: held at the top widths, charged to the budgets
            held.append(name)
            pairs = [max(pairs)]
            coeffs = [0.0]
        elif scores is not None:
            value = float(entry)
            if not math.isfinite(value) or value < 0:
                raise PlanningError(f"score of layer {name!r} must be a finite non-negative number, got {value!r}")
            coeffs = [-value * ((gain(w) if cost.has_weight else 0.0) + gain(a)) for w, a in pairs]
        else:
            given: dict[tuple[int, int], float] = {}
            for key, value in entry.items():
                given[_normalise_damage_key(key, not cost.has_weight, top_a)] = float(value)
            usable = [p for p in pairs if p in given]
            if not usable:
                raise PlanningError(f"damage table for layer {name!r} lists none of its candidate widths {pairs}")
            for p in usable:
                if not math.isfinite(given[p]):
                    raise PlanningError(f"damage of layer {name!r} at w{p[0]}a{p[1]} is not finite")
            pairs = usable
            coeffs = [given[p] for p in pairs]
        names.append(name)
        choices.append(pairs)
        objective.append(coeffs)
    return _Problem(names, choices, objective, held)


# --------------------------------------------------------------------------- solving


def _flat(problem: _Problem):
    index = []
    for layer, pairs in enumerate(problem.choices):
        for pair in pairs:
            index.append((layer, pair))
    return index


def _budget_rows(problem, index, budgets, costs, latency, scale_bytes):
    rows, offsets, scales = [], [], []
    for budget in budgets:
        offset, scale = _offset_and_scale(budget.kind, costs, latency)
        row = np.array([
            _metric(budget.kind, problem.names[layer], costs[problem.names[layer]], w, a, latency, scale_bytes)
            for layer, (w, a) in index
        ])
        rows.append(row)
        offsets.append(offset)
        scales.append(scale)
    return rows, offsets, scales


def _one_hot(problem, index) -> sparse.csr_matrix:
    data = np.ones(len(index))
    cols = np.arange(len(index))
    rows = np.array([layer for layer, _ in index])
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(problem.names), len(index)))


def _solve(c, one_hot, rows, rhs, time_limit):
    constraints = [LinearConstraint(one_hot, 1, 1)]
    for row, bound in zip(rows, rhs):
        norm = max(abs(bound), np.abs(row).max(initial=0.0), 1e-30)
        constraints.append(LinearConstraint(row[None, :] / norm, -np.inf, bound / norm + _TOLERANCE))
    return milp(
        c,
        constraints=constraints,
        integrality=np.ones(len(c)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 1e-9, "time_limit": time_limit},
    )


def _tie_break(problem, index):
    """A tiny preference for more bits, far below any objective difference within a layer."""
    gaps = []
    for coeffs in problem.objective:
        values = sorted(set(coeffs))
        gaps += [b - a for a, b in zip(values, values[1:]) if b - a > 0]
    scale = min(gaps) if gaps else 1.0
    step = 1e-3 * scale / max(1, len(problem.names))
    return np.array([-step * (w + a) / 16.0 for _, (w, a) in index])


def allocate(
    costs: Mapping[str, LayerCost],
    budgets: str | Budget | Iterable[str | Budget],
    *,
    scores: Mapping[str, float] | None = None,
    damage: Mapping[str, Mapping[Any, float]] | None = None,
    options: AllocationOptions | None = None,
    method: str = "ilp",
    provenance: Mapping[str, Any] | None = None,
    time_limit: float = 120.0,
    **overrides: Any,
) -> BitPlan:
    """The bit plan that optimises the objective under every budget (see the module docstring).

    ``costs``: :func:`edgeq.plan.arch.layer_costs` output; its layers are the
    ones planned. Give exactly one of ``scores`` and ``damage``. ``options``
    (:class:`AllocationOptions`), with ``overrides`` of its fields, e.g.
    ``w_bits=(2, 4, 8)``: candidate widths, benefit, and the latency table,
    required for a ``latency-ms`` budget and, when given, checked against
    ``model_name`` and ``target`` (if given) and against the layers of
    ``costs``. ``method`` is recorded in the plan's provenance, with
    ``provenance`` merged in.
    """
    opts = AllocationOptions.merged(options, **overrides)
    benefit, latency, scale_bytes = opts.benefit, opts.latency, opts.scale_bytes
    budget_list = parse_budgets(budgets)
    if (scores is None) == (damage is None):
        raise PlanningError("allocate needs exactly one of scores and damage")
    if not costs:
        raise PlanningError("nothing to plan: no layers")
    w_bits = sorted({int(b) for b in opts.w_bits})
    a_bits = sorted({int(b) for b in opts.a_bits})
    if not w_bits or not a_bits:
        raise PlanningError("w_bits and a_bits must each list at least one width")
    if not all(MIN_BITS <= b <= MAX_BITS for b in (*w_bits, *a_bits)):
        raise PlanningError(f"candidate widths must lie in {MIN_BITS}..{MAX_BITS}; got w {w_bits}, a {a_bits}")
    table = load_latency_table(latency) if latency is not None else None
    if table is not None:
        table.check(model=opts.model_name, target=opts.target, layers=costs)
    if any(b.kind == LATENCY_MS for b in budget_list) and table is None:
        raise PlanningError("a latency-ms budget needs a latency table (measured for this model and target)")

    problem = _build_problem(costs, scores, damage, w_bits, a_bits, benefit, table)
    index = _flat(problem)
    one_hot = _one_hot(problem, index)
    rows, offsets, scales = _budget_rows(problem, index, budget_list, costs, table, scale_bytes)
    rhs = [(b.limit - off) * sc for b, off, sc in zip(budget_list, offsets, scales)]

    _check_individually_feasible(problem, budget_list, rows, offsets, scales, rhs)

    c = np.array([coef for coeffs in problem.objective for coef in coeffs], dtype=float)
    peak = np.abs(c).max(initial=0.0)
    if peak > 0:
        c = c / peak
    problem.objective = [[v / peak if peak > 0 else v for v in coeffs] for coeffs in problem.objective]
    c = c + _tie_break(problem, index)

    result = _solve(c, one_hot, rows, rhs, time_limit)
    if result.x is None:
        if result.status == 2:
            _raise_jointly_infeasible(problem, index, one_hot, budget_list, rows, offsets, scales, rhs, time_limit)
        raise PlanningError(f"bit allocation failed: {result.message}")

    chosen = np.round(result.x).astype(bool)
    layers: dict[str, LayerBits] = {}
    for (layer, (w, a)), on in zip(index, chosen):
        if on:
            layers[problem.names[layer]] = LayerBits(w, a)
    if len(layers) != len(problem.names):  # pragma: no cover - the one-hot rows forbid this
        raise PlanningError("bit allocation returned an incomplete plan")

    plan_default = LayerBits(max(w_bits), max(a_bits))
    plan = BitPlan(plan_default, layers, {})
    achieved = plan_metrics(plan, costs, table, scale_bytes)
    info: dict[str, Any] = {
        "method": method,
        "budget": [str(b) for b in budget_list],
        "objective": "scores" if scores is not None else "damage",
        "w_bits": w_bits,
        "a_bits": a_bits,
        "scale_bytes_per_channel": scale_bytes,
        "achieved": {k: _round(v) for k, v in achieved.items()},
        "solver": {"status": int(result.status), "message": str(result.message), "optimal": result.status == 0},
    }
    if scores is not None:
        info["benefit"] = benefit if isinstance(benefit, str) else getattr(benefit, "__name__", "custom")
        info["scores"] = {name: _round(float(scores[name])) for name in problem.names if name in scores}
    if problem.held:
        info["held_at_max"] = problem.held
    if table is not None:
        info["latency_table"] = {"model": table.model, "target": table.target}
    info.update(dict(provenance or {}))
    return BitPlan(plan_default, layers, info)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _check_individually_feasible(problem, budgets, rows, offsets, scales, rhs) -> None:
    """Each budget on its own: below the sum of per-layer minima is infeasible whatever the others."""
    problems = []
    for budget, row, offset, scale, bound in zip(budgets, rows, offsets, scales, rhs):
        position, lowest = 0, 0.0
        for pairs in problem.choices:
            lowest += min(row[position : position + len(pairs)])
            position += len(pairs)
        if lowest > bound + _TOLERANCE * max(abs(bound), 1.0):
            minimum = offset + lowest / scale
            problems.append((budget, minimum))
    if problems:
        parts = [
            f"budget {b} is infeasible: the smallest feasible is {format_budget(b.kind, m)}"
            + _minimum_hint(b.kind, bool(problem.held))
            for b, m in problems
        ]
        raise BudgetInfeasibleError("; ".join(parts))


def _minimum_hint(kind: str, held: bool) -> str:
    hint = {
        AVG_BITS: "every weight layer at its lowest width",
        WEIGHT_BYTES: "every weight layer at its lowest width, scales included",
        BOPS: "every layer at its lowest widths",
        LATENCY_MS: "every layer at its fastest measured widths, plus base_ms",
    }[kind]
    if held:
        hint += ", unscored layers held at the highest"
    return f" ({hint})"


def _raise_jointly_infeasible(problem, index, one_hot, budgets, rows, offsets, scales, rhs, time_limit):
    parts = []
    for k, budget in enumerate(budgets):
        others_rows = [r for j, r in enumerate(rows) if j != k]
        others_rhs = [b for j, b in enumerate(rhs) if j != k]
        peak = np.abs(rows[k]).max(initial=0.0)
        result = _solve(rows[k] / peak if peak > 0 else rows[k], one_hot, others_rows, others_rhs, time_limit)
        if result.x is not None:
            minimum = offsets[k] + float(rows[k] @ np.round(result.x)) / scales[k]
            others = ", ".join(str(b) for j, b in enumerate(budgets) if j != k)
            parts.append(f"with {others} the smallest feasible is {format_budget(budget.kind, minimum)}")
    listed = ", ".join(str(b) for b in budgets)
    detail = "; ".join(parts) if parts else "and no single budget can be relaxed alone to fix it"
    raise BudgetInfeasibleError(f"budgets {listed} cannot all be met: {detail}")
