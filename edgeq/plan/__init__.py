"""Mixed-precision planning: layer scores (LRP, nuclear norm), budgets, and ILP bit allocation.

Typical use::

    costs = layer_costs(model)                       # params and MACs per layer
    scores = lrp_scores(model, calibration_images)   # or nuclear_scores(...)
    plan = allocate(costs, "avg-bits=4", scores=scores, method="lrp")
    write_plan(plan, "plan.json"); plot_plan(scores, plan, "plan.png")

:func:`make_plan` does the three steps for a method named on a command line.
Layer names are those of :mod:`edgeq.plan.arch`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from edgeq.bitplan import BitPlan
from edgeq.errors import PlanningError
from edgeq.plan.allocate import DEFAULT_A_BITS, DEFAULT_W_BITS, SCALE_BYTES, allocate, plan_metrics
from edgeq.plan.arch import (
    LayerCost,
    attention_modules,
    layer_costs,
    matmul_layers,
    quantizable_layers,
    weight_layers,
)
from edgeq.plan.budget import BUDGET_KINDS, Budget, format_budget, parse_budget, parse_budgets
from edgeq.plan.latency import LatencyTable, load_latency_table
from edgeq.plan.lrp import RelevanceTrace, lrp_scores, relevance_trace
from edgeq.plan.nuclear import attention_ranking_loss, nuclear_scores
from edgeq.plan.plot import plot_plan
from edgeq.plan.random_plan import random_plan, random_scores

PLAN_METHODS = ("lrp", "nuclear", "random")

__all__ = [
    "PLAN_METHODS", "make_plan", "allocate", "plan_metrics", "layer_costs", "LayerCost", "weight_layers",
    "matmul_layers", "quantizable_layers", "attention_modules", "Budget", "BUDGET_KINDS", "parse_budget",
    "parse_budgets", "format_budget", "LatencyTable", "load_latency_table", "lrp_scores", "relevance_trace",
    "RelevanceTrace", "nuclear_scores", "attention_ranking_loss", "random_plan", "random_scores", "plot_plan",
    "DEFAULT_W_BITS", "DEFAULT_A_BITS", "SCALE_BYTES",
]


def make_plan(
    model: nn.Module,
    method: str,
    budgets: str | Budget | Iterable[str | Budget],
    images: torch.Tensor | None = None,
    *,
    input_size=None,
    include_matmuls: bool = True,
    seed: int = 0,
    w_bits: Sequence[int] = DEFAULT_W_BITS,
    a_bits: Sequence[int] = DEFAULT_A_BITS,
    benefit: str | Callable[[int], float] = "noise",
    latency: LatencyTable | str | Mapping | None = None,
    model_name: str | None = None,
    target: str | None = None,
    scale_bytes: float = SCALE_BYTES,
) -> tuple[BitPlan, dict[str, float]]:
    """Score ``model``'s layers with ``method`` and allocate bits under ``budgets``.

    Returns the plan and the scores it was made from. ``images`` (a calibration
    batch) is needed by "lrp" and "nuclear"; "random" needs none.
    """
    if method not in PLAN_METHODS:
        raise PlanningError(f"unknown planning method {method!r}: use one of {', '.join(PLAN_METHODS)}")
    budget_list = parse_budgets(budgets)  # malformed budgets fail before any model work
    costs = layer_costs(model, input_size, include_matmuls=include_matmuls)
    options = dict(w_bits=w_bits, a_bits=a_bits, benefit=benefit, latency=latency, model_name=model_name,
                   target=target, scale_bytes=scale_bytes)
    if method == "random":
        plan = random_plan(costs, budget_list, seed=seed, **options)
        return plan, dict(plan.provenance.get("scores", {}))
    if images is None:
        raise PlanningError(f"planning method {method!r} needs calibration images")
    if method == "lrp":
        scores = lrp_scores(model, images, include_matmuls=include_matmuls)
    else:
        scores = nuclear_scores(model, images, include_matmuls=include_matmuls)
    extra = {"calibration_images": int(images.shape[0])}
    if model_name:
        extra["model"] = model_name
    return allocate(costs, budget_list, scores=scores, method=method, provenance=extra, **options), scores
