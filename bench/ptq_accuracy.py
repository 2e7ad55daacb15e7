"""Post-training quantization accuracy of the reference models on CIFAR-10 val.

One table per model: float top-1, then W8A8/W6A6/W4A4/W3A3 for minmax, repq and lrp-qvit, and
ablation rows at W4A4; each quantized figure is the mean and standard deviation over seeds
(the seed picks the class-balanced calibration images of the recipe, by default
calibration/cifar10-32.yaml: 32 CIFAR-10 train images, and seeds the range search). Prints
markdown; ``--out PATH`` also writes PATH.json and PATH.md.

The validation images are decoded once into a tensor and every configuration is scored on it
(``edgeq.evaluate`` would decode all of them again for each of the ~50 runs per model); the
preprocessing is the same, so the FP32 figure matches ``edgeq eval``.

    python bench/ptq_accuracy.py --out results/ptq            # the full run
    python bench/ptq_accuracy.py --limit 200 --seeds 1 --bits w4a4 --no-ablations   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import print_machine  # noqa: E402  (bench/machine.py, beside this script)
os.environ.setdefault("EDGEQ_DATA", str(REPO.parent / "shared" / "data"))

from edgeq.data import data_config  # noqa: E402
from edgeq.data.calibration import CalibrationRecipe, load_calibration, resolve_recipe  # noqa: E402
from edgeq.errors import WeightsUnavailableError  # noqa: E402
from edgeq.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgeq.models import REFERENCE_MODELS, create_model  # noqa: E402
from edgeq.quant import METHODS, quantize  # noqa: E402
from edgeq.quant.reconstruct import RECONSTRUCTION_METHODS, ReconstructionConfig  # noqa: E402

BITS = ("w8a8", "w6a6", "w4a4", "w3a3")
# (label, method, options) at W4A4
ABLATIONS = (
    ("lrp-qvit", "lrp-qvit", {}),
    ("lrp-qvit, no clipping (= repq)", "lrp-qvit", {"clip": False}),
    ("lrp-qvit, no reparameterization", "lrp-qvit", {"reparam": False}),
    ("lrp-qvit, uniform softmax (no log2)", "lrp-qvit", {"log2": False}),
    ("lrp-qvit, min/max ranges (no search)", "lrp-qvit", {"search": False}),
    ("repq, no reparameterization", "repq", {"reparam": False}),
    ("repq, uniform softmax (no log2)", "repq", {"log2": False}),
)


def model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--models, --val, --calib and --device, shared by the accuracy benches."""
    parser.add_argument("--models", nargs="+", default=sorted(REFERENCE_MODELS), choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--val", default="cifar10/val.tar.gz", help="folder or archive (also under $EDGEQ_DATA)")
    parser.add_argument("--calib", default=str(REPO / "calibration" / "cifar10-32.yaml"),
                        help="calibration recipe (YAML) or data folder/archive")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto: where calibration, sensitivity "
                                                         "trials and reconstruction run (scoring stays on the CPU)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_and_data_arguments(parser)
    parser.add_argument("--calib-images", type=int, default=None, help="override the recipe's count")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate on N class-balanced val images (0: all)")
    parser.add_argument("--bits", nargs="+", default=list(BITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--reconstruct", nargs="+", default=["none"], choices=list(RECONSTRUCTION_METHODS),
                        help="block reconstruction after calibration: one grid row per method and choice")
    parser.add_argument("--recon-iters", type=int, default=ReconstructionConfig.iters,
                        help="reconstruction iterations per block")
    parser.add_argument("--recon-weight-lr", type=float, default=ReconstructionConfig.weight_lr,
                        help="learning rate of the rounding variables")
    parser.add_argument("--random-init", action="store_true", help="random weights (when bundled weights are missing)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    return parser.parse_args()


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(images)


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": values}


def fmt(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def run_model(name: str, args: argparse.Namespace) -> dict:
    try:
        model = create_model(name, pretrained=not args.random_init)
    except WeightsUnavailableError as exc:
        print(f"{name}: skipped ({exc})", file=sys.stderr)
        return {"model": name, "skipped": str(exc)}
    config = data_config(model)
    val = load_calibration(CalibrationRecipe(data=args.val, count=args.limit or sys.maxsize, seed=0), config)
    images, labels = val.images, val.labels
    recipes = {seed: resolve_recipe(args.calib, count=args.calib_images, seed=seed) for seed in range(args.seeds)}
    calib = {seed: load_calibration(recipe, config).images for seed, recipe in recipes.items()}

    result = {"model": name, "val_images": len(images), "calib_images": len(calib[0]), "seeds": args.seeds,
              "calib_data": recipes[0].data,
              "fp32": top1(model, images, labels, args.batch_size), "grid": {}, "ablations": {}}
    print(f"{name}: float top-1 {result['fp32']:.2f} % on {len(images)} images", file=sys.stderr)

    def measure(bits: str, method: str, options: dict, recon: str = "none") -> dict:
        accs, secs = [], []
        for seed in range(args.seeds):
            reconstruction = ReconstructionConfig(method=recon, iters=args.recon_iters, weight_lr=args.recon_weight_lr,
                                                  seed=seed)
            start = time.perf_counter()
            qmodel = quantize(model, calib[seed], bits, method=method, seed=seed, reconstruction=reconstruction,
                              device=args.device, **options)
            secs.append(time.perf_counter() - start)
            for unit in (qmodel.metadata.get("reconstruction") or {}).get("units", []):
                print(f"    {unit['unit']}: block output error {unit['start_error']:.4g} -> {unit['final_error']:.4g}"
                      f"{'' if unit['kept'] else ' (calibrated start kept)'}", file=sys.stderr)
            accs.append(top1(qmodel, images, labels, args.batch_size))
        cell = summarize(accs)
        cell["quantize_seconds"] = statistics.fmean(secs)
        print(f"  {bits} {method} {recon if recon != 'none' else ''} {options or ''}: {fmt(cell)} "
              f"({cell['quantize_seconds']:.0f} s per quantization)", file=sys.stderr)
        return cell

    for method in args.methods:
        for recon in args.reconstruct:
            row = method if recon == "none" else f"{method} + {recon}" if recon == "gptq" else \
                f"{method} + {recon} ({args.recon_iters} it, lr {args.recon_weight_lr:g})"
            result["grid"][row] = {bits: measure(bits, method, {}, recon) for bits in args.bits}
    if not args.no_ablations:
        for label, method, options in ABLATIONS:
            if not options and "w4a4" in args.bits and method in result["grid"]:
                result["ablations"][label] = result["grid"][method]["w4a4"]
            else:
                result["ablations"][label] = measure("w4a4", method, options)
    return result


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    done = [r for r in results if "skipped" not in r]
    count = done[0]["calib_images"] if done else args.calib_images
    source = done[0]["calib_data"] if done else args.calib
    lines = ["# PTQ accuracy on CIFAR-10 val", "",
             f"Top-1 %, mean ± std over {args.seeds} seed(s); {count} class-balanced calibration images from "
             f"`{source}` per seed.", ""]
    for res in results:
        if "skipped" in res:
            lines += [f"## {res['model']}", "", f"Skipped: {res['skipped']}", ""]
            continue
        lines += [f"## {res['model']}", "", f"{res['val_images']} val images. FP32: **{res['fp32']:.2f} %**", ""]
        lines += ["| method | " + " | ".join(b.upper() for b in args.bits) + " |",
                  "|---|" + "---|" * len(args.bits)]
        for method, cells in res["grid"].items():
            lines.append(f"| {method} | " + " | ".join(fmt(cells.get(b)) for b in args.bits) + " |")
        if res["ablations"]:
            lines += ["", "Ablations at W4A4:", "", "| variant | top-1 |", "|---|---|"]
            lines += [f"| {label} | {fmt(cell)} |" for label, cell in res["ablations"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    print_machine()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_model(name, args) for name in args.models]
    text = markdown(results, args)
    print(text)
    if args.out is not None:
        base = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "torch": torch.__version__, "results": results}
        atomic_write_json(base.with_suffix(".json"), payload)
        atomic_write_text(base.with_suffix(".md"), text + "\n")
        print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
