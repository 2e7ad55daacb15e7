"""Per-operator timing on a board for ``edgeq profile --per-op``.

TVM 0.27's Relax VM has no profiler (``VirtualMachine.profile`` is gone), and its instrumentation hook takes a
callback that would run on the board, not here. So the integer kernels are timed one by one instead: the
artifact's ``model.onnx`` is lowered again exactly as the build did (:func:`edgeq.build.lower`), every integer
kernel ``R.call_tir`` of ``main`` is listed with its layer (:func:`edgeq.lower.integer.integer_kernel_calls`),
the distinct kernel PrimFuncs are compiled into one small library for the target, and each call is timed on the
board with ``time_evaluator`` on its real constants (weights, biases, requantization) and seeded random
activations of its shapes and dtypes. What the kernels do not cover (LayerNorm, Softmax, GELU, residual adds,
activation quantization, VM overhead) is ``base_ms`` = whole-model median minus the kernels' sum. A kernel timed
alone sees warmer caches than inside the model, so the sum tends to be a little lower than in place.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _random_like(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -128), min(int(info.max), 127)
        return rng.integers(low, high + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _struct(expr) -> tuple[tuple[int, ...], str]:
    """Static shape and dtype of a Relax expression, or of a tensor type (TVM 0.27 calls struct info ``ty``)."""
    sinfo = getattr(expr, "ty", None) or getattr(expr, "struct_info", None) or expr
    return tuple(int(d) for d in sinfo.shape.values), str(sinfo.dtype)


def kernel_calls(artifact) -> tuple[Any, list[dict[str, Any]]]:
    """``(lowered module, [{"layer", "kernel", "args": [(shape, dtype, constant or None)], "out": (shape, dtype)}])``."""
    import tvm

    from edgeq.build import lower
    from edgeq.deploy import artifact_target
    from edgeq.lower.integer import integer_kernel_calls

    spec = artifact_target(artifact)
    mod = lower(artifact.path("model.onnx"), spec, artifact.precision)
    calls = []
    for layer, kernel, call in integer_kernel_calls(mod, str(artifact.manifest.get("entry", "main"))):
        args = []
        for arg in call.args[1].fields:
            shape, dtype = _struct(arg)
            constant = arg.value.numpy() if isinstance(arg, tvm.ir.expr.Constant) else None
            args.append((shape, dtype, constant))
        out_info = call.ty_args[0]  # call_tir's output type (TVM 0.27: ty_args, formerly sinfo_args)
        calls.append({"layer": layer, "kernel": kernel, "args": args, "out": _struct(out_info)})
    return mod, calls


def time_kernels(artifact, session, *, repeat: int = 10, total_ms: float | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Median milliseconds of every integer kernel call of the artifact on the board, by layer, with its bits;
    ``base_ms`` is ``total_ms`` minus their sum (see module doc)."""
    import tvm

    from edgeq.compile import export_library
    from edgeq.deploy import artifact_target

    spec = artifact_target(artifact)
    mod, calls = kernel_calls(artifact)
    if not calls:
        return {"method": "per-kernel time_evaluator", "layers": {}, "base_ms": total_ms or 0.0, "kernels_ms": 0.0}
    kernels = tvm.IRModule({name: mod[name] for name in dict.fromkeys(c["kernel"] for c in calls)})
    with tempfile.TemporaryDirectory(prefix="edgeq-kernels-") as tmp:
        library = export_library(tvm.compile(kernels, target=spec.tvm_target()), spec, Path(tmp) / "kernels.so")
        remote = session.load_module(library, target=spec)
    device = session.device(spec.device_kind)
    rng = np.random.default_rng(seed)
    bits = (artifact.manifest.get("bits") or {}).get("layers") or {}
    default = (artifact.manifest.get("bits") or {}).get("default") or {}
    layers: dict[str, dict[str, Any]] = {}
    for call in calls:
        arrays = [constant if constant is not None else _random_like(shape, dtype, rng)
                  for shape, dtype, constant in call["args"]]
        out_shape, out_dtype = call["out"]
        tensors = [session.tensor(np.ascontiguousarray(a), spec.device_kind) for a in arrays]
        tensors.append(session.tensor(np.zeros(out_shape, out_dtype), spec.device_kind))
        with session._remote(f"timing kernel {call['kernel']}"):
            timer = remote.time_evaluator(call["kernel"], device, number=1, repeat=repeat)
            ms = float(np.median(timer(*tensors).results)) * 1e3
        layer_bits = bits.get(call["layer"], default)
        w, a = int(layer_bits.get("w", 8)), int(layer_bits.get("a", 8))
        if call["layer"].rsplit(".", 1)[-1].startswith("matmul_"):
            w = a  # attention matmuls have one width (the planner's latency table writes "aN")
        entry = layers.setdefault(call["layer"], {"w": w, "a": a, "ms": 0.0, "kernels": []})
        entry["ms"] = round(entry["ms"] + ms, 5)
        entry["kernels"].append(call["kernel"])
    summed = sum(e["ms"] for e in layers.values())
    base = max(0.0, (total_ms or summed) - summed)
    return {"method": "per-kernel time_evaluator (kernels built alone; rest of the model is base_ms)",
            "layers": layers, "kernels_ms": round(summed, 4), "base_ms": round(base, 4)}
