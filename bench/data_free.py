"""Data-free calibration against real images, on the reference models and CIFAR-10 val.

For each seed: the real calibration recipe's images (calibration/cifar10-32.yaml, its draw picked by the
seed), and ``--count`` images synthesized from the model (``edgeq.quant.synthetic``, PSAQ-ViT patch
similarity, ``--steps`` Adam steps, the same seed), each quantized at ``--bits`` with ``--method`` and,
with ``--reconstruct gptq``, also reconstructed on those same images; top-1 on ``--limit``
class-balanced val images (decoded once). Prints one markdown table: mean +- std over the seeds and the
gap of each data-free row to the real-image row of the same method.

    python bench/data_free.py --models edgeq/vit-cifar10 --seeds 3 --limit 1000 --reconstruct none gptq
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import print_machine  # noqa: E402  (bench/machine.py, beside this script)
os.environ.setdefault("EDGEQ_DATA", str(REPO.parent / "shared" / "data"))

from ptq_accuracy import top1  # noqa: E402

from edgeq.data import data_config  # noqa: E402
from edgeq.data.calibration import CalibrationRecipe, load_calibration, resolve_recipe  # noqa: E402
from edgeq.models import create_model  # noqa: E402
from edgeq.quant import METHODS, quantize  # noqa: E402
from edgeq.quant.reconstruct import ReconstructionConfig  # noqa: E402
from edgeq.quant.synthetic import synthesize_calibration  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["edgeq/vit-cifar10"], choices=["edgeq/vit-cifar10",
                                                                                       "edgeq/swin-cifar10"])
    parser.add_argument("--val", default="cifar10/val.tar.gz")
    parser.add_argument("--calib", default=str(REPO / "calibration" / "cifar10-32.yaml"))
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--method", default="lrp-qvit", choices=list(METHODS))
    parser.add_argument("--count", type=int, default=32, help="synthetic images")
    parser.add_argument("--steps", type=int, nargs="+", default=[40], help="synthesis steps (one row each)")
    parser.add_argument("--reconstruct", nargs="+", default=["none"], choices=["none", "gptq"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    print_machine()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    for name in args.models:
        model = create_model(name).eval()
        config = data_config(model)
        val = load_calibration(CalibrationRecipe(data=args.val, count=args.limit or sys.maxsize, seed=0), config)
        size = tuple(int(v) for v in config["input_size"])
        rows: dict[str, list[float]] = {}
        seconds: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            recipe = resolve_recipe(args.calib)
            sources = {"real": load_calibration(dataclasses.replace(recipe, seed=seed), config).images}
            for steps in args.steps:
                start = time.perf_counter()
                sources[f"synthetic, {steps} steps"] = synthesize_calibration(model, size, count=args.count,
                                                                              steps=steps, seed=seed)
                seconds.setdefault(f"synthetic, {steps} steps", []).append(time.perf_counter() - start)
            for source, images in sources.items():
                for recon in args.reconstruct:
                    reconstruction = None if recon == "none" else ReconstructionConfig(method=recon)
                    qmodel = quantize(model, images, args.bits, method=args.method, seed=seed,
                                      reconstruction=reconstruction, cache=False)
                    label = source if recon == "none" else f"{source} + {recon}"
                    rows.setdefault(label, []).append(top1(qmodel, val.images, val.labels, 250))
                    print(f"  seed {seed} {label}: {rows[label][-1]:.2f}", flush=True)
        print(f"\n{name} {args.bits} {args.method}, {len(val.images)} val images, {args.count} synthetic images, "
              f"seeds 0..{args.seeds - 1}\n")
        print("| calibration | top-1 | gap to real (same reconstruction) | synthesis s |")
        print("|---|---|---|---|")
        for label, values in rows.items():
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            recon = label.split(" + ")[1] if " + " in label else None
            real = rows["real" if recon is None else f"real + {recon}"]
            gap = "" if label.startswith("real") else f"{mean - statistics.fmean(real):+.2f}"
            source = label.split(" + ")[0]
            synth = f"{statistics.fmean(seconds[source]):.0f}" if source in seconds else ""
            print(f"| {label} | {mean:.2f} ± {std:.2f} | {gap} | {synth} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
