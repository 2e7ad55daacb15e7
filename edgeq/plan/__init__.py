"""Mixed-precision planning: layer scores (LRP, nuclear norm), measured sensitivity, budgets, ILP allocation.

Typical use::

    costs = layer_costs(model)                       # params and MACs per layer
    scores = lrp_scores(model, calibration_images)   # or nuclear_scores(...)
    plan = allocate(costs, "avg-bits=4", scores=scores, method="lrp")
    write_plan(plan, "plan.json"); plot_plan(scores, plan, "plan.png")

:func:`make_plan` does the steps for a method named on a command line:

* ``lrp``, ``nuclear``: per-layer importance scores; the allocator minimises
  score-weighted quantization noise (:mod:`edgeq.plan.allocate`).
* ``sensitivity`` (Mix-QViT): measured damage of each layer at each width
  (:mod:`edgeq.plan.sensitivity`); the allocator minimises the summed damage.
* ``mix``: the measured damage weighted by LRP relevance,
  ``damage_l(w, a) * (1 + r_l / mean(r)) / 2`` with ``r_l`` the layer's LRP
  score (:func:`mix_damage`): relevance moves a layer's charge between half and
  (1 + r_l/mean(r))/2 times its measured damage, so a layer the prediction
  leans on is protected more, and one with almost no relevance still pays half.
* ``random``: the control, random importances at the same budget.

Every plan's provenance names the method, budgets, scores, the model's weights
hash (``model_sha256``) and, for the methods that look at images, the
calibration images' hash (``calibration_sha256``).
Layer names are those of :mod:`edgeq.plan.arch`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from edgeq.bitplan import BitPlan
from edgeq.errors import PlanningError
from edgeq.plan.allocate import (
    DEFAULT_A_BITS,
    DEFAULT_W_BITS,
    SCALE_BYTES,
    AllocationOptions,
    allocate,
    plan_metrics,
)
from edgeq.plan.arch import (
    MATMUL_SUFFIXES,
    LayerCost,
    attention_modules,
    layer_costs,
    matmul_layers,
    quantizable_layers,
    weight_layers,
)
from edgeq.plan.budget import BUDGET_KINDS, Budget, format_budget, parse_budget, parse_budgets
from edgeq.plan.latency import LatencyTable, load_latency_table, width_key
from edgeq.plan.lrp import RelevanceTrace, lrp_scores, relevance_trace
from edgeq.plan.nuclear import attention_ranking_loss, nuclear_scores
from edgeq.plan.plot import plot_plan
from edgeq.plan.random_plan import random_plan, random_scores
from edgeq.plan.sensitivity import SensitivityTable, images_digest, measure_sensitivity, model_digest

PLAN_METHODS = ("lrp", "sensitivity", "nuclear", "mix", "random")

__all__ = [
    "PLAN_METHODS", "check_method", "make_plan", "allocate", "plan_metrics", "layer_costs", "LayerCost", "weight_layers",
    "matmul_layers", "quantizable_layers", "attention_modules", "Budget", "BUDGET_KINDS", "parse_budget",
    "parse_budgets", "format_budget", "LatencyTable", "load_latency_table", "lrp_scores", "relevance_trace",
    "RelevanceTrace", "nuclear_scores", "attention_ranking_loss", "random_plan", "random_scores", "plot_plan",
    "DEFAULT_W_BITS", "DEFAULT_A_BITS", "SCALE_BYTES", "AllocationOptions", "SensitivityTable",
    "measure_sensitivity", "mix_damage", "LayerObjective", "layer_objective", "model_digest", "images_digest",
]


def check_method(method: str) -> None:
    """Refuse a planning method edgeq does not have (before any model work)."""
    if method not in PLAN_METHODS:
        raise PlanningError(f"unknown planning method {method!r}: use one of {', '.join(PLAN_METHODS)}")


def mix_damage(damage: Mapping[str, Mapping[tuple[int, int], float]],
               relevance: Mapping[str, float]) -> dict[str, dict[tuple[int, int], float]]:
    """Measured damage weighted by LRP relevance: ``damage_l * (1 + r_l / mean(r)) / 2``.

    ``mean(r)`` is over the layers that have a relevance score; a layer without
    one (``matmul_qk``: no relevance flows through Q @ K^T with the softmax held
    constant) counts as average (weight 1).
    """
    known = [float(v) for name, v in relevance.items() if name in damage]
    mean = sum(known) / len(known) if known else 0.0
    if mean <= 0:
        raise PlanningError("mix needs positive LRP relevance for at least one layer")
    weights = {name: (1.0 + float(relevance[name]) / mean) / 2.0 if name in relevance else 1.0 for name in damage}
    return {name: {pair: value * weights[name] for pair, value in table.items()} for name, table in damage.items()}


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {name: float(f"{v:.6g}") for name, v in values.items()}


@dataclass
class LayerObjective:
    """What a planning method learnt about the layers, ready to allocate under any budget.

    ``scores``: one number per layer (importance for ``lrp``/``nuclear``; for
    ``sensitivity``/``mix`` the damage at the lowest candidate widths), for plots
    and provenance. ``damage``: per-layer ``{(w, a): damage}`` tables for the
    damage-minimising methods, None when the allocator works on ``scores``.
    """

    method: str
    scores: dict[str, float]
    damage: dict[str, dict[tuple[int, int], float]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def allocate(self, costs: Mapping[str, LayerCost], budgets: str | Budget | Iterable[str | Budget], *,
                 options: AllocationOptions | None = None, provenance: Mapping[str, Any] | None = None,
                 **overrides: Any) -> BitPlan:
        """The plan for ``budgets`` (:func:`edgeq.plan.allocate.allocate`), provenance included."""
        extra = {**dict(provenance or {}), **self.provenance}
        if self.damage is None:
            return allocate(costs, budgets, scores=self.scores, method=self.method, provenance=extra,
                            options=options, **overrides)
        extra["scores"] = _rounded({n: v for n, v in self.scores.items() if n in costs})
        extra["damage"] = {
            name: {width_key(w, a, name.rsplit(".", 1)[-1] in MATMUL_SUFFIXES): float(f"{v:.6g}")
                   for (w, a), v in table.items()}
            for name, table in self.damage.items() if name in costs
        }
        return allocate(costs, budgets, damage=self.damage, method=self.method, provenance=extra,
                        options=options, **overrides)


def layer_objective(
    model: nn.Module,
    method: str,
    images: torch.Tensor,
    *,
    include_matmuls: bool = True,
    quant_method: str = "lrp-qvit",
    w_bits: Sequence[int] = DEFAULT_W_BITS,
    a_bits: Sequence[int] = DEFAULT_A_BITS,
    progress: Callable[[int, int, str], None] | None = None,
    sensitivity_reconstruct: str = "none",
    device: str | torch.device | None = None,
) -> LayerObjective:
    """Score (``lrp``, ``nuclear``) or measure (``sensitivity``, ``mix``) the layers of ``model`` on ``images``
    (``sensitivity_reconstruct``: see :func:`measure_sensitivity`'s ``reconstruct``; ``device``: where its trials
    run)."""
    check_method(method)
    if method == "random":
        raise PlanningError("the random control has no layer objective: use random_plan")
    if method in ("lrp", "nuclear"):
        score = lrp_scores if method == "lrp" else nuclear_scores
        return LayerObjective(method, score(model, images, include_matmuls=include_matmuls))
    table = measure_sensitivity(model, images, method=quant_method, w_bits=w_bits, a_bits=a_bits, progress=progress,
                                reconstruct=sensitivity_reconstruct, device=device)
    damage, scores = table.damage(), table.scores()
    info: dict[str, Any] = {"sensitivity": {**{k: v for k, v in table.info.items() if k != "key"},
                                            "quant_method": quant_method}}
    if sensitivity_reconstruct != "none":
        info["sensitivity"]["reconstruct"] = sensitivity_reconstruct
    if method == "mix":
        relevance = lrp_scores(model, images, include_matmuls=include_matmuls)
        damage = mix_damage(damage, relevance)
        scores = {name: table[min(table)] for name, table in damage.items()}  # at the lowest widths
        info["relevance"] = _rounded(relevance)
        info["mix_formula"] = "damage_l(w, a) * (1 + r_l / mean(r)) / 2"
    return LayerObjective(method, scores, damage, info)


def make_plan(
    model: nn.Module,
    method: str,
    budgets: str | Budget | Iterable[str | Budget],
    images: torch.Tensor | None = None,
    *,
    input_size=None,
    include_matmuls: bool = True,
    seed: int = 0,
    quant_method: str = "lrp-qvit",
    options: AllocationOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    sensitivity_reconstruct: str = "none",
    device: str | torch.device | None = None,
    **overrides: Any,
) -> tuple[BitPlan, dict[str, float]]:
    """Score ``model``'s layers with ``method`` and allocate bits under ``budgets``.

    Returns the plan and the per-layer scores it was made from (for
    ``sensitivity`` and ``mix``: the damage at the lowest candidate widths).
    ``images`` (a calibration batch) is needed by every method but "random".
    ``quant_method``: the quantization the ``sensitivity``/``mix`` trials use
    (as :func:`edgeq.quant.quantize`'s ``method``). ``options``/``overrides``:
    :class:`AllocationOptions` (candidate widths, latency table, model name...).
    ``progress(done, total, layer)`` follows the sensitivity trials; ``sensitivity_reconstruct``
    "gptq" makes them measure GPTQ-rounded layers (:func:`measure_sensitivity`); ``device``: where they run.
    """
    check_method(method)
    budget_list = parse_budgets(budgets)  # malformed budgets fail before any model work
    opts = AllocationOptions.merged(options, **overrides)
    costs = layer_costs(model, input_size, include_matmuls=include_matmuls)
    if opts.latency is not None:  # a table for another model or target fails before any scoring
        table = load_latency_table(opts.latency)
        table.check(model=opts.model_name, target=opts.target, layers=costs)
        opts = AllocationOptions.merged(opts, latency=table)
    extra: dict[str, Any] = {"model_sha256": model_digest(model)}
    if opts.model_name:
        extra["model"] = opts.model_name
    if method == "random":
        plan = random_plan(costs, budget_list, seed=seed, options=opts, provenance=extra)
        return plan, dict(plan.provenance.get("scores", {}))
    if images is None:
        raise PlanningError(f"planning method {method!r} needs calibration images")
    extra.update(calibration_images=int(images.shape[0]), calibration_sha256=images_digest(images))
    if method in ("sensitivity", "mix"):
        # The trials take minutes: a budget no plan meets fails first (any scores give the same feasible set).
        allocate(costs, budget_list, scores=dict.fromkeys(costs, 1.0), options=opts)
    objective = layer_objective(model, method, images, include_matmuls=include_matmuls, quant_method=quant_method,
                                w_bits=opts.w_bits, a_bits=opts.a_bits, progress=progress,
                                sensitivity_reconstruct=sensitivity_reconstruct, device=device)
    return objective.allocate(costs, budget_list, options=opts, provenance=extra), objective.scores
