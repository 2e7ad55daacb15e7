"""Per-operator timing on a board for ``edgeq profile --per-op``.

TVM 0.27's Relax VM has no profiler (``VirtualMachine.profile`` is gone), and its instrumentation hook takes a
callback that would run on the board, not here. So every PrimFunc that ``main`` calls is timed one call at a
time instead: the artifact's ``model.onnx`` is lowered again exactly as the build did, with the build's tuning
database (:func:`edgeq.lower.lower_model` with ``schedule_only``): the build's scheduling passes leave
``main`` a dataflow of ``R.call_tir`` to scheduled PrimFuncs: the integer kernels (listed with their layer by
:func:`edgeq.lower.integer.integer_kernel_calls`) and the float "glue" between them (LayerNorm, Softmax, GELU,
residual adds, activation quantization, log2 codes, copies). Reshapes are not timed: the build turns a PrimFunc
that only reshapes into a view of its input (``RewriteDataflowReshape``), and so does this lowering. The distinct PrimFuncs are compiled into one
small library for the target with the build's TIR pipeline, and each call is timed on the board with
``time_evaluator`` on its real constants (weights, biases, LayerNorm parameters) and seeded random activations
of its shapes and dtypes.

Result keys: ``layers`` (integer kernels by layer, with bits: the planner's latency table), ``kernels_ms``,
``glue`` (per glue PrimFunc: ``ms`` summed over its calls, ``calls``, ``after``: the layer of the integer
kernel each call follows, ``"input"`` before the first), ``glue_ms``, ``overhead_ms`` (whole-model median minus
kernels and glue: the VM's own time, allocation, and what timing alone misses) and ``base_ms`` (whole-model
median minus the kernels only, as before: the planner adds it to the kernels it picks). A PrimFunc timed alone
sees warmer caches than inside the model, so sums tend to be a little lower than in place.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ArgSpec = tuple[tuple[int, ...], str, Any]  # (shape, dtype, constant array or None)


def _random_like(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -128), min(int(info.max), 127)
        return rng.integers(low, high + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _struct(expr) -> tuple[tuple[int, ...], str]:
    """Static shape and dtype of a Relax expression, or of a tensor type (TVM 0.27 calls struct info ``ty``)."""
    sinfo = getattr(expr, "ty", None) or getattr(expr, "struct_info", None) or expr
    return tuple(int(d) for d in sinfo.shape.values), str(sinfo.dtype)


def _outputs(out_info) -> list[tuple[tuple[int, ...], str]]:
    """The output tensors of a ``call_tir`` (a tuple type for PrimFuncs with several outputs, e.g. split)."""
    fields = getattr(out_info, "fields", None)
    return [_struct(f) for f in fields] if fields is not None else [_struct(out_info)]


def _arg_specs(call) -> list[ArgSpec]:
    import tvm

    specs = []
    for arg in call.args[1].fields:
        shape, dtype = _struct(arg)
        constant = arg.value.numpy() if isinstance(arg, tvm.ir.expr.Constant) else None
        specs.append((shape, dtype, constant))
    return specs


def primfunc_calls(mod, entry: str = "main") -> list[dict[str, Any]]:
    """Every ``R.call_tir`` of ``entry`` in order, on a scheduled module (:func:`schedule_relax`):
    ``{"func", "kind": "kernel" | "glue", "layer", "args": [ArgSpec], "outs": [(shape, dtype)]}``; ``layer`` is
    the kernel's layer, or for glue the layer of the integer kernel it follows (``"input"`` before the first)."""
    import tvm
    from tvm import relax

    from edgeq.lower.integer import integer_kernel_calls

    kernels = [(layer, call) for layer, _, call in integer_kernel_calls(mod, entry)]
    calls, after = [], "input"
    for block in mod[entry].body.blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name == "relax.call_tir"):
                continue
            is_kernel = bool(kernels) and value.same_as(kernels[0][1])  # both walk the bindings in order
            if is_kernel:
                after = kernels.pop(0)[0]
            calls.append({"func": value.args[0].name_hint, "kind": "kernel" if is_kernel else "glue",
                          "layer": after, "args": _arg_specs(value), "outs": _outputs(value.ty_args[0])})
    return calls


def artifact_tuning_db(artifact):
    """The tuning database the artifact's build applied (None when it had none), checked to be the same
    database still: per-op timing must time the schedules the board's library has."""
    from edgeq.errors import EdgeqError
    from edgeq.lower.tuning_database import TuningDatabase

    entry = artifact.manifest.tuning
    if entry is None or not entry.database:
        return None
    database = TuningDatabase.open(entry.database, option=f"the tuning database of {artifact.dir}")
    if database.digest() != entry.sha256:
        raise EdgeqError(f"the tuning database {entry.database} changed since {artifact.dir} was built with it "
                         "(its sha256 differs): per-op times would not be those of the artifact's schedules; "
                         "rebuild the artifact with it, or restore it")
    return database


def scheduled_calls(artifact) -> tuple[Any, list[dict[str, Any]]]:
    """``(scheduled module, primfunc_calls of its entry)`` for an artifact, lowered and scheduled as its build was
    (its tuning database applied)."""
    from edgeq.runtime import artifact_target
    from edgeq.lower import lower_model

    from tvm import relax

    lowered = lower_model(artifact.path("model.onnx"), artifact_target(artifact), artifact.precision,
                          tuning_db=artifact_tuning_db(artifact), schedule_only=True)
    # as the build's dataflow lowering does: a PrimFunc that only reshapes becomes a view of its input, no call
    mod = relax.transform.RewriteDataflowReshape()(lowered.module)
    return mod, primfunc_calls(mod, artifact.manifest.entry)


def time_calls(mod, calls: list[dict[str, Any]], spec, session, *, repeat: int = 10, seed: int = 0) -> list[float]:
    """Median milliseconds of each call (one library of the distinct PrimFuncs, timed on the board)."""
    import tvm

    from edgeq.compile.library import export_library
    from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE

    # legalized PrimFuncs have no global_symbol until Relax's build adds one; without it there is no entry point
    funcs = tvm.IRModule({name: mod[name].with_attr("global_symbol", name)
                          for name in dict.fromkeys(c["func"] for c in calls)})
    tvm_target = spec.tvm_target()
    tir_pipeline = EXACT_FP_TIR_PIPELINE if tvm_target.kind.name == "llvm" else "default"
    with tempfile.TemporaryDirectory(prefix="edgeq-primfuncs-") as tmp:
        built = tvm.compile(funcs, target=tvm_target, tir_pipeline=tir_pipeline)
        remote = session.load_module(export_library(built, spec, Path(tmp) / "primfuncs.so"), target=spec)
    device = session.device(spec.device_kind)
    rng = np.random.default_rng(seed)
    times = []
    for call in calls:
        arrays = [constant if constant is not None else _random_like(shape, dtype, rng)
                  for shape, dtype, constant in call["args"]]
        arrays += [np.zeros(shape, dtype) for shape, dtype in call["outs"]]
        tensors = [session.tensor(np.array(a, order="C"), spec.device_kind) for a in arrays]  # 0-d stays 0-d
        with session.remote_step(f"timing {call['func']}"):
            timer = remote.time_evaluator(call["func"], device, number=1, repeat=repeat)
            times.append(float(np.median(timer(*tensors).results)) * 1e3)
    return times


def summarize(calls: list[dict[str, Any]], times: list[float], manifest_bits: dict[str, Any],
              total_ms: float | None) -> dict[str, Any]:
    """The ``per_op`` result (module doc) from the calls and their times."""
    bits = manifest_bits.get("layers") or {}
    default = manifest_bits.get("default") or {}
    layers: dict[str, dict[str, Any]] = {}
    glue: dict[str, dict[str, Any]] = {}
    for call, ms in zip(calls, times):
        if call["kind"] == "glue":
            entry = glue.setdefault(call["func"], {"ms": 0.0, "calls": 0, "after": []})
            entry["ms"] = round(entry["ms"] + ms, 5)
            entry["calls"] += 1
            entry["after"].append(call["layer"])
            continue
        layer_bits = bits.get(call["layer"], default)
        w, a = int(layer_bits.get("w", 8)), int(layer_bits.get("a", 8))
        if call["layer"].rsplit(".", 1)[-1].startswith("matmul_"):
            w = a  # attention matmuls have one width (the planner's latency table writes "aN")
        entry = layers.setdefault(call["layer"], {"w": w, "a": a, "ms": 0.0, "kernels": []})
        entry["ms"] = round(entry["ms"] + ms, 5)
        entry["kernels"].append(call["func"])
    kernels_ms = sum(e["ms"] for e in layers.values())
    glue_ms = sum(e["ms"] for e in glue.values())
    total = total_ms if total_ms is not None else kernels_ms + glue_ms
    glue = dict(sorted(glue.items(), key=lambda item: -item[1]["ms"]))
    return {"method": "per-PrimFunc time_evaluator (each call built and timed alone; the VM's own time is "
                      "overhead_ms; base_ms is everything but the integer kernels)",
            "layers": layers, "kernels_ms": round(kernels_ms, 4), "base_ms": round(max(0.0, total - kernels_ms), 4),
            "glue": glue, "glue_ms": round(glue_ms, 4),
            "overhead_ms": round(max(0.0, total - kernels_ms - glue_ms), 4)}


def time_kernels(artifact, session, *, repeat: int = 10, total_ms: float | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Median milliseconds of every PrimFunc call of the artifact's model on the board: integer kernels by layer
    with their bits, glue PrimFuncs by name, and what is left of ``total_ms`` (see module doc)."""
    from edgeq.runtime import artifact_target

    spec = artifact_target(artifact)
    mod, calls = scheduled_calls(artifact)
    times = time_calls(mod, calls, spec, session, repeat=repeat, seed=seed) if calls else []
    return summarize(calls, times, artifact.manifest.bits.to_json(), total_ms)
