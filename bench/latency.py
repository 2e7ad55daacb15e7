"""Whole-model latency on this host: PyTorch, ONNX Runtime (fp32 and its own int8) and edgeq, in one run.

    python bench/latency.py [--models deit_tiny_patch16_224 edgeq/vit-cifar10] [--repeat 30] [--threads 2]

For each model (batch 1; timm models with random weights, edgeq reference models with their bundled ones):

* ``torch fp32``   PyTorch eager, ``torch.inference_mode``;
* ``ort fp32``     ONNX Runtime (all graph optimizations) on the float ONNX export
                   (:func:`edgeq.lower.export.export_float_onnx`);
* ``ort int8``     ONNX Runtime on its own static QDQ quantization of that file
                   (``onnxruntime.quantization.quantize_static``: uint8 activations, per-channel int8 weights,
                   MinMax over ``--calib`` random images);
* ``edgeq fp32``   the float ONNX file through :func:`edgeq.lower.relax_import.import_onnx` and
                   :func:`edgeq.lower.pipeline.compile_relax` (fp32 GEMM kernels, scheduled float ops);
* ``edgeq w8a8``   / ``edgeq w4/8`` (MLP weights 4-bit, everything else 8-bit): ``edgeq.quant.quantize``
                   with ``--method`` (default lrp-qvit, what ``edgeq build`` uses: log2 post-Softmax codes;
                   random calibration images, the scales do not change the latency), QDQ export,
                   :func:`edgeq.lower.integer.lower_integer`, ``compile_relax`` -- reported as not available
                   when the integer lowering is not importable;
* ``edgeq w8a8-unfused`` (with ``--unfused``): the same W8A8 file with ``lower_integer(fuse_epilogues=False)``:
                   the float ops after fc1, fc2 and proj (dequantize, GELU, quantize, residual add) as separate
                   glue instead of in the GEMMs' epilogues, to show what the fusion buys in the same run;
* ``edgeq w8a8+pv4`` (with ``--narrow-av``): W8A8 with every ``matmul_av`` at 4 bits (its softmax codes and
                   ``v``), whose p @ v x86 runs as an int16 GEMM.

Each edgeq build runs in a child process, which reports its compile time (import + lowering + TVM build +
link) and its peak resident memory (``ru_maxrss``, Python and the libraries included). Timing interleaves the
contenders: every round calls each one twice and times the second call (the first lets the previous contender's
idle threads settle), ``--repeat`` rounds, after ``--warmup`` calls each; the table
gives median and 90th percentile over rounds and each edgeq row's median as a ratio to ONNX Runtime fp32 and
int8. On a loaded machine only the ratios of one run mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("deit_tiny_patch16_224", "edgeq/vit-cifar10")


def _set_threads(threads: int) -> None:
    # thread counts must be fixed before the runtimes start their pools
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # TVM pins workers to cores by default; on a shared machine that serializes them behind other jobs
    os.environ.setdefault("TVM_BIND_THREADS", "0")


# --- child process: one edgeq build -------------------------------------------------------------------

def build_child(spec_path: str) -> int:
    """Import, lower and compile one ONNX file into a host library; print a JSON line with time and memory."""
    spec = json.loads(Path(spec_path).read_text())
    _set_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    from edgeq.compile.library import export_library
    from edgeq.lower.kernels.runner import host_target
    from edgeq.lower.pipeline import compile_relax
    from edgeq.lower.relax_import import import_onnx

    target = host_target(spec["threads"])
    mod = import_onnx(spec["onnx"], batch=1)
    if spec["integer"]:
        from edgeq.lower.integer import lower_integer

        mod = lower_integer(mod, target, fuse_epilogues=spec.get("fuse_epilogues", True))
    built = compile_relax(mod, target)
    export_library(built, "host", spec["library"])
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"compile_s": seconds, "peak_mib": peak_kib / 1024.0}))
    return 0


def run_build(onnx_path: Path, library: Path, *, integer: bool, threads: int, timeout: float,
              fuse_epilogues: bool = True) -> dict:
    spec = library.with_suffix(".json")
    spec.write_text(json.dumps({"onnx": str(onnx_path), "library": str(library), "integer": integer,
                                "threads": threads, "fuse_epilogues": fuse_epilogues}))
    proc = subprocess.run([sys.executable, __file__, "--build-child", str(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"build exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- parent: prepare contenders and time them ---------------------------------------------------------

def _input_size(model) -> tuple[int, int, int]:
    from edgeq.data import data_config

    return tuple(int(v) for v in data_config(model)["input_size"])


def _create(name: str):
    from edgeq.models import create_model

    return create_model(name, pretrained=name.startswith("edgeq/"))


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle onnxruntime workers must not spin on the cores the next contender (interleaved) needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_int8(float_path: Path, out: Path, calib) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x[None]} for x in calib])

        def get_next(self):
            return next(self.items, None)

    prepared = out.with_name(out.stem + ".pre.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    except Exception:  # pre-processing only helps the quantizer; quantize the export as it is otherwise
        prepared = float_path
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _mixed_plan(model):
    from edgeq.bitplan import BitPlan, LayerBits
    from edgeq.quant.convert import quantizable_layers

    layers = {name: LayerBits(4, 8) for name in quantizable_layers(model) if ".mlp." in name}
    return BitPlan(LayerBits(8, 8), layers, {"method": "bench", "note": "MLP weights 4-bit"})


def _narrow_av_plan(model):
    from edgeq.bitplan import BitPlan, LayerBits
    from edgeq.quant.convert import quantizable_layers

    layers = {name: LayerBits(4, 4) for name in quantizable_layers(model) if name.endswith(".matmul_av")}
    return BitPlan(LayerBits(8, 8), layers, {"method": "bench", "note": "4-bit softmax codes and v in every p@v"})


def _edgeq_runner(library: Path, example):
    import numpy as np
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    arg = tvm.runtime.tensor(np.ascontiguousarray(example))
    main = vm["main"]
    return lambda: main(arg), lambda: main(arg).numpy()


def prepare_model(name: str, args, work: Path, log) -> tuple[list[tuple[str, object]], list[dict], dict]:
    """``([(contender, call)], build rows, agreement)`` for one model."""
    import numpy as np
    import torch

    from edgeq.lower.export import export_float_onnx, export_onnx

    model = _create(name).eval()
    size = _input_size(model)
    rng = np.random.default_rng(0)
    example = rng.standard_normal((1,) + size).astype(np.float32)
    calib = rng.standard_normal((args.calib,) + size).astype(np.float32)
    slug = name.replace("/", "_")
    contenders: list[tuple[str, object]] = []
    builds: list[dict] = []
    outputs: dict[str, np.ndarray] = {}

    x_torch = torch.from_numpy(example)

    def torch_call():
        with torch.inference_mode():
            return model(x_torch)

    contenders.append(("torch fp32", torch_call))
    outputs["torch fp32"] = torch_call().numpy()

    log(f"{name}: float ONNX export")
    float_onnx = export_float_onnx(model, work / f"{slug}.onnx", input_size=size)
    ort_fp32 = _ort_session(float_onnx, args.threads)
    contenders.append(("ort fp32", lambda: ort_fp32.run(None, {"input": example})))
    outputs["ort fp32"] = ort_fp32.run(None, {"input": example})[0]

    log(f"{name}: onnxruntime static int8 quantization")
    int8_onnx = _ort_int8(float_onnx, work / f"{slug}.ort-int8.onnx", calib)
    ort_int8 = _ort_session(int8_onnx, args.threads)
    contenders.append(("ort int8", lambda: ort_int8.run(None, {"input": example})))
    outputs["ort int8"] = ort_int8.run(None, {"input": example})[0]

    variants = [("edgeq fp32", float_onnx, False, True)]
    from edgeq.quant import quantize

    images = torch.from_numpy(calib)
    plans = [("edgeq w8a8", "w8a8"), ("edgeq w4/8", _mixed_plan(model))]
    if args.narrow_av:
        plans.append(("edgeq w8a8+pv4", _narrow_av_plan(model)))
    for label, plan in plans:
        log(f"{name}: {label} quantization and QDQ export")
        try:
            qmodel = quantize(model, images, plan, method=args.method)
            onnx_path = export_onnx(qmodel, work / f"{slug}.{label.split()[1].replace('/', '-')}.onnx", int4="int8",
                                    batch=1)
            variants.append((label, onnx_path, True, True))
            if args.unfused and plan == "w8a8":
                variants.append(("edgeq w8a8-unfused", onnx_path, True, False))
        except Exception as err:  # report and go on with the other contenders
            builds.append({"contender": label, "error": f"quantize/export: {err}"})

    for label, path, integer, fuse in variants:
        log(f"{name}: building {label}")
        library = work / f"{slug}.{label.split()[1].replace('/', '-')}.so"
        row = {"contender": label, **run_build(path, library, integer=integer, threads=args.threads,
                                               timeout=args.build_timeout, fuse_epilogues=fuse)}
        builds.append(row)
        if "error" in row:
            continue
        call, result = _edgeq_runner(library, example)
        contenders.append((label, call))
        outputs[label] = result()
    reference = outputs["torch fp32"]
    agreement = {label: float(np.abs(out - reference).max()) for label, out in outputs.items() if label != "torch fp32"}
    return contenders, builds, agreement


def time_interleaved(contenders, repeat: int, warmup: int) -> dict[str, list[float]]:
    for _, call in contenders:
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {label: [] for label, _ in contenders}
    for _ in range(repeat):
        for label, call in contenders:
            # one untimed call first: TVM's pool workers spin for a while after each parallel region, holding a
            # core the next contender needs (ONNX Runtime fp32 timed 24 ms right after edgeq, 17.5 ms alone)
            call()
            start = time.perf_counter()
            call()
            times[label].append((time.perf_counter() - start) * 1e3)
    return times


def summarize(name: str, times, builds, agreement) -> list[dict]:
    import numpy as np

    rows = []
    med = {label: float(np.median(v)) for label, v in times.items()}
    for label, values in times.items():
        row = {"model": name, "contender": label, "median_ms": med[label],
               "p90_ms": float(np.percentile(values, 90)), "max_abs_diff_vs_torch": agreement.get(label)}
        if label.startswith("edgeq"):
            row["vs_ort_fp32"] = med[label] / med["ort fp32"]
            row["vs_ort_int8"] = med[label] / med["ort int8"]
        build = next((b for b in builds if b["contender"] == label), None)
        if build:
            row.update({k: v for k, v in build.items() if k != "contender"})
        rows.append(row)
    for build in builds:
        if "error" in build:
            rows.append({"model": name, "contender": build["contender"], "error": build["error"]})
    return rows


def print_table(rows) -> None:
    header = f"{'model':<24} {'contender':<18} {'median ms':>10} {'p90 ms':>9} {'/ort fp32':>9} {'/ort int8':>9} " \
             f"{'build s':>8} {'peak MiB':>9} {'max|diff|':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<24} {r['contender']:<18} not available: {r['error']}")
            continue

        def f(key, fmt):
            value = r.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else ""

        print(f"{r['model']:<24} {r['contender']:<18} {f('median_ms', '10.2f'):>10} {f('p90_ms', '9.2f'):>9} "
              f"{f('vs_ort_fp32', '9.2f'):>9} {f('vs_ort_int8', '9.2f'):>9} {f('compile_s', '8.1f'):>8} "
              f"{f('peak_mib', '9.0f'):>9} {f('max_abs_diff_vs_torch', '9.1e'):>9}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--repeat", type=int, default=30, help="interleaved timing rounds (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8, help="random calibration images for the int8 contenders")
    ap.add_argument("--method", choices=["lrp-qvit", "repq", "minmax"], default="lrp-qvit",
                    help="edgeq's quantization method (minmax: uniform post-Softmax codes instead of log2)")
    ap.add_argument("--build-timeout", type=float, default=1800.0)
    ap.add_argument("--unfused", action="store_true", help="also time W8A8 without epilogue fusion")
    ap.add_argument("--narrow-av", action="store_true", help="also time W8A8 with 4-bit p@v (softmax codes and v)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--build-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_child:
        return build_child(args.build_child)
    if args.repeat < 1 or args.threads < 1 or args.calib < 4:
        ap.error("--repeat and --threads must be >= 1, --calib >= 4")
    _set_threads(args.threads)
    from machine import print_machine  # bench/machine.py: python puts this script's folder on sys.path

    print_machine()
    sys.path.insert(0, str(ROOT))
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeq-latency-") as tmp:
        for name in args.models:
            contenders, builds, agreement = prepare_model(name, args, Path(tmp), log)
            log(f"{name}: timing {len(contenders)} contenders, {args.repeat} interleaved rounds")
            times = time_interleaved(contenders, args.repeat, args.warmup)
            rows += summarize(name, times, builds, agreement)
            del contenders
    print(f"batch 1, {args.threads} threads, {args.repeat} interleaved rounds; ratios are edgeq median / "
          "onnxruntime median (goal for deit_tiny w8a8: <= 0.8 x ort int8 and <= 0.5 x ort fp32)")
    print_table(rows)
    if args.json:
        sys.path.insert(0, str(ROOT))
        from edgeq.fileio import atomic_write_json

        atomic_write_json(args.json, {"threads": args.threads, "repeat": args.repeat, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
