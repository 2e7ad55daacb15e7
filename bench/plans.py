"""Mixed-precision bit plans against uniform bits, on the reference models and CIFAR-10 val.

For each model and each average weight width B (``--avg-bits``, default 3 4 5 6), every row
spends the same weight bytes: uniform ``W B`` on every weight layer, then the plans of ``lrp``,
``sensitivity``, ``nuclear`` and ``mix`` under the budget ``avg-bits=B`` (candidate weight widths
2, 3, 4, 6, 8; weight bytes equal the uniform row's, as the per-channel scales are the same), and
the random control at the same budget (``--random-seeds`` seeds, mean and spread reported).
Activations: every row of a table uses one width A for all activations (``--a-bits``, default 4:
the issue's comparison is against uniform W4A4; with 8 the weight allocation is seen without
activation noise), so rows differ only in where the weight bits go.

Every model is quantized with ``--quant-method`` (lrp-qvit) on the calibration recipe
(calibration/cifar10-32.yaml: 32 train images; the ``sensitivity``/``mix`` trials calibrate on
half of them and measure on the other half) and scored on ``--limit`` class-balanced val images
(default all 5000), decoded once. Seeded: recipe seed, range-search seed 0, random-control seeds
0..N-1. Prints markdown; ``--out PATH`` writes PATH.json, PATH.md and PATH.png (top-1 against
weight bytes, one panel per model and activation width).

With ``--reconstruct gptq|adaround`` every measured plan, the uniform rows too, is block-reconstructed
after calibration, on ``--recon-calib`` (e.g. calibration/cifar10-256.yaml; default the planning recipe),
while the planners keep scoring layers on calibration alone: a cheap proxy whose plans are then judged
reconstructed against reconstructed uniform bits.

    python bench/plans.py --models edgeq/vit-cifar10 --limit 1000 --out results/plans
    python bench/plans.py --limit 200 --avg-bits 4 --random-seeds 1          # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import print_machine  # noqa: E402  (bench/machine.py, beside this script)
os.environ.setdefault("EDGEQ_DATA", str(REPO.parent / "shared" / "data"))

from ptq_accuracy import model_and_data_arguments, top1  # noqa: E402  (bench/ is on sys.path when this script runs)

from edgeq.bitplan import BitPlan  # noqa: E402
from edgeq.data import data_config  # noqa: E402
from edgeq.data.calibration import CalibrationRecipe, load_calibration, resolve_recipe  # noqa: E402
from edgeq.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgeq.models import create_model  # noqa: E402
from edgeq.plan import (  # noqa: E402
    MATMUL_SUFFIXES,
    AllocationOptions,
    layer_costs,
    layer_objective,
    model_digest,
    plan_metrics,
    random_plan,
)
from edgeq.quant import METHODS, quantize  # noqa: E402
from edgeq.quant.reconstruct import RECONSTRUCTION_METHODS, ReconstructionConfig  # noqa: E402

PLANNERS = ("lrp", "sensitivity", "nuclear", "mix")
# sensitivity whose trials GPTQ-round each layer: is the cheap proxy (round-to-nearest trials) ranking layers as a
# reconstructed model would? Not a default column (its trials cost a Hessian pass each).
RECONSTRUCTED_SENSITIVITY = "sensitivity-gptq"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_and_data_arguments(parser)
    parser.add_argument("--limit", type=int, default=0, help="evaluate on N class-balanced val images (0: all 5000)")
    parser.add_argument("--avg-bits", type=int, nargs="+", default=[3, 4, 5, 6])
    parser.add_argument("--a-bits", type=int, nargs="+", default=[4], help="activation width of every row (one table each)")
    parser.add_argument("--planners", nargs="+", default=list(PLANNERS), choices=[*PLANNERS, RECONSTRUCTED_SENSITIVITY])
    parser.add_argument("--random-seeds", type=int, default=3, help="random-control plans per budget (seeds 0..N-1)")
    parser.add_argument("--quant-method", default="lrp-qvit", choices=list(METHODS))
    parser.add_argument("--reconstruct", default="none", choices=list(RECONSTRUCTION_METHODS),
                        help="block reconstruction of every measured plan, uniform rows included (the planners still "
                             "score layers on calibration alone)")
    parser.add_argument("--recon-iters", type=int, default=ReconstructionConfig.iters)
    parser.add_argument("--recon-calib", default=None,
                        help="calibration recipe of the measured (reconstructed) plans; default: --calib")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png")
    return parser.parse_args()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_model(name: str, args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every table of one model; ``save(result)`` is called after each row, so a cut-off run keeps its rows."""
    model = create_model(name)
    config = data_config(model)
    val = load_calibration(CalibrationRecipe(data=args.val, count=args.limit or sys.maxsize, seed=0), config)
    calib = load_calibration(resolve_recipe(args.calib), config).images
    final_calib = calib if args.recon_calib is None else load_calibration(resolve_recipe(args.recon_calib), config).images
    reconstruction = None if args.reconstruct == "none" else \
        ReconstructionConfig(method=args.reconstruct, iters=args.recon_iters)
    costs = layer_costs(model)
    result = {"model": name, "model_sha256": model_digest(model), "val_images": len(val.images), "calib_images": len(calib),
              "reconstruct": args.reconstruct, "final_calib_images": len(final_calib),
              "fp32": top1(model, val.images, val.labels, args.batch_size), "seconds": {}, "tables": {}}
    log(f"{name}: float top-1 {result['fp32']:.2f} % on {len(val.images)} images")

    objectives = {}
    for planner in args.planners:
        start = time.perf_counter()
        if planner == RECONSTRUCTED_SENSITIVITY:
            objectives[planner] = layer_objective(model, "sensitivity", calib, quant_method=args.quant_method,
                                                  sensitivity_reconstruct="gptq", device=args.device)
        else:
            objectives[planner] = layer_objective(model, planner, calib, quant_method=args.quant_method,
                                                  device=args.device)
        result["seconds"][planner] = round(time.perf_counter() - start, 1)
        log(f"  {planner} scores: {result['seconds'][planner]} s")
    if {"sensitivity", RECONSTRUCTED_SENSITIVITY} <= set(objectives):
        result["damage_rank_correlation"] = damage_rank_correlation(objectives["sensitivity"].damage,
                                                                    objectives[RECONSTRUCTED_SENSITIVITY].damage)
        log("  Spearman rank correlation of the layers' damage, round-to-nearest vs GPTQ trials: "
            + ", ".join(f"{k} {v:.3f}" for k, v in result["damage_rank_correlation"].items()))

    def measure(plan: BitPlan) -> dict:
        qmodel = quantize(model, final_calib, plan, method=args.quant_method, reconstruction=reconstruction,
                          device=args.device)
        metrics = plan_metrics(plan, costs)
        return {"top1": top1(qmodel, val.images, val.labels, args.batch_size),
                "weight_bytes": metrics["weight-bytes"], "avg_bits": metrics["avg-bits"],
                "layers": {layer: [bits.w, bits.a] for layer, bits in plan.layers.items()}}

    for a_bits in args.a_bits:
        options = AllocationOptions(a_bits=(a_bits,), model_name=name)
        table = {}
        for bits in args.avg_bits:
            budget = f"avg-bits={bits}"
            row = {"uniform": measure(BitPlan.uniform(bits, a_bits, method="uniform"))}
            for planner, objective in objectives.items():
                row[planner] = measure(objective.allocate(costs, budget, options=options))
            runs = [measure(random_plan(costs, budget, seed=seed, options=options)) for seed in range(args.random_seeds)]
            if runs:
                values = [r["top1"] for r in runs]
                row["random"] = {"top1": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                 "runs": values, "weight_bytes": statistics.fmean(r["weight_bytes"] for r in runs),
                                 "avg_bits": statistics.fmean(r["avg_bits"] for r in runs)}
            table[str(bits)] = row
            result["tables"][f"a{a_bits}"] = table
            save(result)
            log(f"  A{a_bits} {budget}: " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in row.items()))
    return result


def damage_rank_correlation(plain: dict, reconstructed: dict) -> dict[str, float]:
    """Per weight width ``w`` (activations at the widest): Spearman's rank correlation over the weight layers of
    their damage in the two tables (no ties expected in measured damage)."""
    out = {}
    widths = sorted({w for table in plain.values() for (w, a) in table})
    for w in widths:
        names = [n for n, table in plain.items()
                 if any(k[0] == w for k in table) and n in reconstructed and n.rsplit(".", 1)[-1] not in MATMUL_SUFFIXES]
        if len(names) < 3:
            continue
        top_a = {n: max(a for (ww, a) in plain[n] if ww == w) for n in names}
        xs = torch.tensor([plain[n][(w, top_a[n])] for n in names], dtype=torch.float64)
        ys = torch.tensor([reconstructed[n][(w, top_a[n])] for n in names], dtype=torch.float64)
        rx, ry = xs.argsort().argsort().double(), ys.argsort().argsort().double()
        out[f"w{w}"] = float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])
    return out


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    columns = ["uniform", *args.planners] + (["random"] if args.random_seeds else [])
    lines = ["# Bit plans on CIFAR-10 val", "",
             f"Top-1 %. Each row: one average weight width (same weight bytes in every column); quantized with "
             f"`{args.quant_method}` on `{Path(args.calib).name}`"
             + (f", every plan then reconstructed ({args.reconstruct}) on `{Path(args.recon_calib or args.calib).name}`"
                if args.reconstruct != "none" else "")
             + f"; random: mean ± std over {args.random_seeds} "
             f"seed(s). Best plan per row in bold.", ""]
    for res in results:
        for key, table in res["tables"].items():
            a_bits = key[1:]
            lines += [f"## {res['model']}, activations {a_bits} bits", "",
                      f"{res['val_images']} val images. FP32: **{res['fp32']:.2f} %**", "",
                      "| avg W bits | weight KB | " + " | ".join(columns) + " |",
                      "|---|---|" + "---|" * len(columns)]
            for bits, row in sorted(table.items(), key=lambda item: int(item[0])):
                best = max(row[c]["top1"] for c in args.planners)
                cells = []
                for column in columns:
                    cell = row[column]
                    text = f"{cell['top1']:.2f}"
                    if column == "random":
                        text += f" ± {cell['std']:.2f}"
                    elif column in args.planners and cell["top1"] == best:
                        text = f"**{text}**"
                    cells.append(text)
                label = f"W{bits}A{a_bits}"
                lines.append(f"| {label} | {row['uniform']['weight_bytes'] / 1e3:.1f} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def pareto_plot(results: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(res, key) for res in results for key in res["tables"]]
    fig = Figure(figsize=(6.0 * len(panels), 4.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    for index, (res, key) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        table = dict(sorted(res["tables"][key].items(), key=lambda item: int(item[0])))
        methods = list(next(iter(table.values())))
        for method in methods:
            xs = [row[method]["weight_bytes"] / 1e3 for row in table.values()]
            ys = [row[method]["top1"] for row in table.values()]
            style = {"uniform": dict(color="black", linestyle="--", marker="s"),
                     "random": dict(color="grey", linestyle=":", marker="x")}.get(method, dict(marker="o"))
            if method == "random":
                ax.errorbar(xs, ys, yerr=[row[method]["std"] for row in table.values()], label=method, capsize=3,
                            **style)
            else:
                ax.plot(xs, ys, label=method, **style)
        ax.axhline(res["fp32"], color="green", linewidth=0.8, label="float")
        ax.set_title(f"{res['model']}, A{key[1:]} ({res['val_images']} val images)")
        ax.set_xlabel("weight bytes (KB, scales included)")
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(partial, dpi=110)
    partial.replace(path)
    return path


def write_outputs(results: list[dict], args: argparse.Namespace) -> str:
    text = markdown(results, args)
    if args.out is not None:
        base = args.out.with_suffix("") if args.out.suffix in (".json", ".md", ".png") else args.out
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "torch": torch.__version__, "results": results}
        atomic_write_json(base.with_suffix(".json"), payload)
        atomic_write_text(base.with_suffix(".md"), text + "\n")
        if any(res["tables"] for res in results):
            pareto_plot(results, base.with_suffix(".png"))
    return text


def main() -> None:
    args = parse_args()
    print_machine()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: list[dict] = []
    for name in args.models:
        # the models done so far plus this one's rows so far
        results.append(run_model(name, args, lambda partial: write_outputs(results + [partial], args)))
    print(write_outputs(results, args))
    if args.out is not None:
        log(f"wrote {args.out.with_suffix('')}.json, .md and .png")


if __name__ == "__main__":
    main()
