"""A random bit plan at the same budget: the control a real planner must beat.

The plan is the ILP optimum (:func:`edgeq.plan.allocate.allocate`) for
*random* layer importances, so it meets every budget and, like a real plan,
spends it about fully; only the knowledge of which layers matter is missing.
Importances are drawn from a flat Dirichlet distribution (i.i.d. exponentials,
normalised), or, given the real ``scores``, are those scores shuffled across
layers (same spread of importances, wrong order). Seeded: the same seed, costs
and budgets give the same plan.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edgeq.bitplan import BitPlan
from edgeq.plan.allocate import AllocationOptions, allocate
from edgeq.plan.arch import LayerCost
from edgeq.plan.budget import Budget


def random_scores(layers: Sequence[str], seed: int = 0, scores: Mapping[str, float] | None = None) -> dict[str, float]:
    """Random importances for ``layers``: Dirichlet(1), or ``scores``' values permuted (seeded)."""
    rng = np.random.default_rng(seed)
    if scores is not None:
        values = np.array([float(scores.get(name, 0.0)) for name in layers])
        values = values[rng.permutation(len(layers))]
    else:
        values = rng.exponential(size=len(layers))
    total = values.sum()
    if total > 0:
        values = values / total
    return {name: float(v) for name, v in zip(layers, values)}


def random_plan(
    costs: Mapping[str, LayerCost],
    budgets: str | Budget | Iterable[str | Budget],
    *,
    seed: int = 0,
    scores: Mapping[str, float] | None = None,
    options: AllocationOptions | None = None,
    provenance: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> BitPlan:
    """A seeded random plan meeting ``budgets`` (see the module docstring).

    ``options``, ``provenance`` and ``overrides``: as for :func:`edgeq.plan.allocate.allocate`.
    """
    layers = list(costs)
    drawn = random_scores(layers, seed=seed, scores=scores)
    extra: dict[str, Any] = {"seed": int(seed), "random_scores": "shuffled" if scores is not None else "dirichlet",
                             **dict(provenance or {})}
    return allocate(costs, budgets, scores=drawn, options=options, method="random", provenance=extra, **overrides)
