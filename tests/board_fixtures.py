"""Small build artifacts and local RPC boards for the deploy / check / profile / board tests.

``make_artifact`` writes a real artifact directory (edgeq.compile.artifact's manifest, hashes and digest) around a tiny
classifier that builds in a fraction of a second: ``logits = int(round(16 x)) @ W`` with int32 weights, computed
in integers (so an integer artifact is bit-exact on every architecture) and returned as float32. ``edgeq build``
makes the real ones; these tests are about deploying and checking, not lowering.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgeq.compile import artifact as art

# x86 servers that only load TVM's runtime library start several times faster, like a runtime-only board
RUNTIME_ONLY = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def tiny_classifier(classes: int = 10, size: int = 32, seed: int = 0, weight_scale: int = 4):
    """A Relax ``main(x: float32[1,3,size,size]) -> float32[1,classes]`` computed in int32; returns (mod, W)."""
    from tvm import relax

    rng = np.random.default_rng(seed)
    features = 3 * size * size
    w = rng.integers(-weight_scale, weight_scale + 1, (features, classes)).astype("int32")
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, size, size], "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            q = builder.emit(relax.op.astype(relax.op.round(relax.op.multiply(x, relax.const(16.0, "float32"))),
                                             "int32"))
            flat = builder.emit(relax.op.reshape(q, [1, features]))
            acc = builder.emit(relax.op.matmul(flat, relax.const(w)))
            out = builder.emit_output(relax.op.astype(acc, "float32"))
        builder.emit_func_output(out)
    return builder.get(), w


def make_artifact(folder: Path, target: str = "host", *, precision: str = "int", seed: int = 0,
                  golden: int = 3, name: str | None = None, plan: dict | None = None,
                  weight_bytes: int = 1000) -> Path:
    """A complete artifact for ``target`` (plus ``host.so`` when the target is not the host)."""
    import tvm
    from tvm import relax

    from edgeq.compile.library import export_for_target
    from edgeq.compile.targets import load_target

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mod, _ = tiny_classifier(seed=seed)
    spec = load_target(target)
    export_for_target(mod, spec, folder / art.LIBRARY)
    files = [art.LIBRARY, art.WEIGHTS, art.PLAN, art.ONNX, art.GOLDEN]
    if spec.arch != "x86_64":
        export_for_target(mod, "host", folder / art.HOST_LIBRARY)
        files.append(art.HOST_LIBRARY)
    reference = folder / (art.HOST_LIBRARY if art.HOST_LIBRARY in files else art.LIBRARY)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(reference)), tvm.cpu())
    inputs = np.random.default_rng(seed + 1).standard_normal((golden, 3, 32, 32)).astype("float32")
    outputs = np.concatenate([vm["main"](tvm.runtime.tensor(inputs[i:i + 1])).numpy() for i in range(golden)])
    np.savez(folder / art.GOLDEN, inputs=inputs, outputs=outputs)
    plan = plan or {"version": 1, "default": {"w": 8, "a": 8}, "layers": {}, "provenance": {"method": "test"}}
    (folder / art.PLAN).write_text(json.dumps(plan))
    (folder / art.WEIGHTS).write_bytes(b"\0" * 16)  # not read by deploy/check
    (folder / art.ONNX).write_bytes(b"onnx")
    manifest = {
        "format": art.FORMAT, "version": art.VERSION, "name": name or folder.name, "created": "2026-01-01T00:00:00Z",
        "precision": precision, "entry": "main", "batch": 1,
        "model": {"name": "test/tiny", "checkpoint": None, "num_classes": 10, "input_size": [3, 32, 32],
                  "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "interpolation": "bicubic", "crop_pct": 1.0},
        "target": {"name": spec.name, "tvm": spec.target, "host": spec.host, "arch": spec.arch,
                   "rpc_key": spec.rpc_key},
        "bits": {"default": plan["default"], "layers": plan.get("layers", {})},
        "files": art.describe_files(folder, files),
        "calibration": {"source": "test", "sha256": "", "images": 0, "seed": 0},
        "accuracy": {"data": "test", "images": 0, "fp_top1": None, "quant_top1": None, "compiled_top1": None,
                     "agreement_compiled_vs_fakequant": None},
        "golden": {"file": art.GOLDEN, "count": golden, "exact": precision == "int",
                   **({} if precision == "int" else {"atol": 1e-4})},
        "weights": {"bytes": weight_bytes, "expected_bytes": weight_bytes, "by_layer": {}},
        "versions": {"edgeq": "test", "tvm": tvm.__version__},
    }
    art.write_manifest(folder, manifest)
    return folder


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``edgeq ARGS`` in this process: (exit code, stdout, stderr)."""
    from cli_runner import run_cli as run

    return run(capsys, *args)
