"""Top-1 agreement of the compiled integer program with the PyTorch fake-quant model on CIFAR-10 val.

For one reference model and one bit plan: calibrate and quantize (``--method``, default lrp-qvit, on the calibration
recipe's images; ``--reconstruct adaround|gptq`` reconstructs blocks after that),
export ONNX QDQ, import into Relax, lower to integer kernels (``edgeq.lower.integer.lower_integer``), compile
for the host with ``edgeq.compile.library.build`` and run the class-balanced val subset through both. Prints one JSON
object: top-1 agreement, accuracies of both, the relative logit error, times. For scale, the same ONNX file run
by onnxruntime (float QDQ, no integer kernels) is compared with the fake-quant model too (``onnxruntime_*``):
float reassociation alone flips some activation codes, so that is the noise floor of any lowering.

    python bench/lowering_agreement.py --model edgeq/vit-cifar10 --bits w8a8 --limit 1000
    python bench/lowering_agreement.py --model edgeq/swin-cifar10 --bits w4a4 --limit 500
    python bench/lowering_agreement.py --model edgeq/vit-cifar10 --plan plan.json --limit 1000
    python bench/lowering_agreement.py --model edgeq/vit-cifar10 --mixed 0 --limit 1000   # seeded random mix

``--batch`` is the compiled module's batch size (images are padded to a multiple of it).

``--noise-floor EPS`` also measures what agreement any lowering can hope for: the fake-quant model against
itself with relative noise of EPS (1e-7: about one float32 rounding step) multiplied into the input of every
activation quantizer but the first (the image is the same on both sides). Low-bit plans amplify such noise:
a code flipped at a rounding boundary moves the next layer by a whole quantization step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import print_machine  # noqa: E402  (bench/machine.py, beside this script)
os.environ.setdefault("EDGEQ_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("TVM_BIND_THREADS", "0")

from edgeq.bitplan import BitPlan, LayerBits, read_plan  # noqa: E402
from edgeq.data import data_config  # noqa: E402
from edgeq.data.calibration import CalibrationRecipe, load_calibration, resolve_recipe  # noqa: E402
from edgeq.models import REFERENCE_MODELS, create_model  # noqa: E402
from edgeq.quant import quantize  # noqa: E402
from edgeq.quant.reconstruct import RECONSTRUCTION_CHOICES, resolve_reconstruction  # noqa: E402
from edgeq.quant.convert import quantizable_layers  # noqa: E402

MIXED_CHOICES = (LayerBits(8, 8), LayerBits(4, 8), LayerBits(4, 4), LayerBits(6, 6))


def mixed_plan(model: torch.nn.Module, seed: int) -> BitPlan:
    """A seeded random mix of W8A8 / W4A8 / W4A4 / W6A6 over every quantizable layer."""
    rng = random.Random(seed)
    layers = {name: rng.choice(MIXED_CHOICES) for name in quantizable_layers(model)}
    return BitPlan(LayerBits(8, 8), layers, {"method": "bench-mixed", "seed": seed})


def fakequant_logits(qmodel: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([qmodel(images[i:i + 100]) for i in range(0, len(images), 100)]).numpy()


def noisy_fakequant_logits(qmodel: torch.nn.Module, images: torch.Tensor, eps: float, seed: int = 1) -> np.ndarray:
    """Logits with every activation quantizer's input (but the image's) scaled by ``1 + eps * N(0, 1)``."""
    from edgeq.quant.modules import LogQuantizer, UniformQuantizer

    generator = torch.Generator().manual_seed(seed)

    def perturb(_module, inputs):
        x = inputs[0]
        return (x * (1.0 + eps * torch.randn(x.shape, generator=generator)),) + tuple(inputs[1:])

    quantizers = [m for name, m in qmodel.named_modules() if isinstance(m, (UniformQuantizer, LogQuantizer))
                  and not name.startswith(("patch_embed", "model.patch_embed"))]
    hooks = [m.register_forward_pre_hook(perturb) for m in quantizers]
    try:
        return fakequant_logits(qmodel, images)
    finally:
        for hook in hooks:
            hook.remove()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="edgeq/vit-cifar10", choices=sorted(REFERENCE_MODELS))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bits", default=None, help="wNaM (default w8a8)")
    group.add_argument("--plan", default=None, help="bit plan JSON")
    group.add_argument("--mixed", type=int, default=None, metavar="SEED", help="seeded random mixed plan")
    parser.add_argument("--val", default="cifar10/val.tar.gz")
    parser.add_argument("--calib", default=str(REPO / "calibration" / "cifar10-32.yaml"))
    parser.add_argument("--limit", type=int, default=1000, help="class-balanced val images (0: all)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--method", default="lrp-qvit", choices=["minmax", "repq", "lrp-qvit"])
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration draw: the recipe's images, the range search's and reconstruction's seed "
                             "(as bench/ptq_accuracy.py's seeds)")
    parser.add_argument("--reconstruct", default="none", choices=list(RECONSTRUCTION_CHOICES),
                        help="block reconstruction after calibration (cached like edgeq quantize's)")
    parser.add_argument("--recon-iters", type=int, default=None, help="reconstruction iterations per block")
    parser.add_argument("--noise-floor", type=float, default=0.0, metavar="EPS",
                        help="also report fake-quant vs itself with relative noise EPS at quantizer inputs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print_machine()
    torch.set_num_threads(args.threads)
    import tvm
    from tvm import relax

    from edgeq.compile.library import build
    from edgeq.lower.export import export_onnx, onnx_logits
    from edgeq.lower.integer import integer_kernel_calls, lower_integer, weight_bytes
    from edgeq.lower.relax_import import import_onnx

    times = {}
    model = create_model(args.model, pretrained=True)
    config = data_config(model)
    if args.plan:
        plan, plan_name = read_plan(args.plan), args.plan
    elif args.mixed is not None:
        plan, plan_name = mixed_plan(model, args.mixed), f"mixed-seed{args.mixed}"
    else:
        plan_name = args.bits or "w8a8"
        plan = BitPlan.from_spec(plan_name)
    val = load_calibration(CalibrationRecipe(data=args.val, count=args.limit or sys.maxsize, seed=0), config)
    calib = load_calibration(resolve_recipe(args.calib, seed=args.seed), config).images

    start = time.perf_counter()
    reconstruction = resolve_reconstruction(args.reconstruct, plan, args.recon_iters, seed=args.seed)
    qmodel = quantize(model, calib, plan, method=args.method, seed=args.seed, reconstruction=reconstruction)
    times["quantize_s"] = time.perf_counter() - start
    images, labels = val.images, val.labels.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(qmodel, Path(tmp) / "model.onnx")
        mod = lower_integer(import_onnx(path, batch=args.batch), "host")
        times["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ort = onnx_logits(path, images)
        times["onnxruntime_run_s"] = time.perf_counter() - start
    kernels = sum(1 for _ in integer_kernel_calls(mod))
    start = time.perf_counter()
    executable = build(mod, "host")
    times["build_s"] = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, tvm.cpu())

    pad = (-len(images)) % args.batch
    padded = torch.cat([images, images[:pad]]) if pad else images
    start = time.perf_counter()
    got = np.concatenate([vm["main"](tvm.runtime.tensor(padded[i:i + args.batch].numpy())).numpy()
                          for i in range(0, len(padded), args.batch)])[:len(images)]
    times["compiled_run_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ref = fakequant_logits(qmodel, images)
    times["torch_run_s"] = time.perf_counter() - start
    floor = {}
    if args.noise_floor:
        noisy = noisy_fakequant_logits(qmodel, images, args.noise_floor)
        floor = {"noise_floor_eps": args.noise_floor,
                 "noise_floor_agreement_top1": float((noisy.argmax(-1) == ref.argmax(-1)).mean()),
                 "noise_floor_logits_rel_err": float(np.linalg.norm(noisy - ref) / np.linalg.norm(ref))}
    result = {
        "model": args.model, "plan": plan_name, "method": args.method, "reconstruct": args.reconstruct, "seed": args.seed,
        "calib": args.calib, "images": len(images), "batch": args.batch,
        "integer_kernels": kernels, "quantized_layers": len(qmodel.metadata["layers"]),
        "weight_bytes": weight_bytes(mod),
        "agreement_top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "compiled_top1": float((got.argmax(-1) == labels).mean()),
        "fakequant_top1": float((ref.argmax(-1) == labels).mean()),
        "logits_rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "logits_max_abs_err": float(np.abs(got - ref).max()),
        "onnxruntime_agreement_top1": float((ort.argmax(-1) == ref.argmax(-1)).mean()),
        "onnxruntime_logits_rel_err": float(np.linalg.norm(ort - ref) / np.linalg.norm(ref)),
        **floor,
        **{k: round(v, 1) for k, v in times.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from edgeq.fileio import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
