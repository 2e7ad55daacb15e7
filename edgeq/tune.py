"""``edgeq tune``: MetaSchedule tuning of the PrimFuncs edgeq does not hand-schedule, stored as a database.

edgeq's integer and fp32 GEMM kernels are hand-scheduled and never tuned. What is left after
:func:`edgeq.lower.pipeline.compile_relax`'s rewrite and TVM's legalization -- LayerNorm, Softmax, GELU,
residual adds, transposes -- gets a generic parallel/vectorized schedule; :func:`tune_module` lets
MetaSchedule search better ones for one target within a trial budget and writes its JSON database
(``database_workload.json``, ``database_tuning_record.json``) into a directory, by default ``tuning/`` beside
the artifact. ``compile_relax(mod, target, tuning_db=DIR)`` then applies the tuned schedules it finds there.

Measurement runs on this machine (``LocalRunner``), so tuning is for the host target; a board target would
need MetaSchedule's RPC runner, which edgeq does not drive yet (a :class:`EdgeqError` says so).

Two things on this kind of machine (``/work/shared/notes/tvm-0.27-facts.md``): MetaSchedule's evolutionary
search builds mutators that crashed the process with apache-tvm-ffi 0.1.15, so the search here is
``replay-trace`` (random samples of the design space, no mutators); and TVM's default MetaSchedule build
function imports ``tvm.s_tir.tensor_intrin`` (about a minute) in every builder worker, so edgeq registers its own
build function in the workers and gives builds a longer timeout. Tuning runs in a child process, so a crash
inside TVM becomes an :class:`EdgeqError` instead of killing the caller.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError

__all__ = ["TuneResult", "tune_module", "tune_onnx", "apply_database_pass", "database_exists", "tunable_tasks"]

_BUILD_FUNC = "edgeq.tune.build"
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass
class TuneResult:
    database: Path
    tasks: int
    trials: int
    records: int


def database_exists(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in DATABASE_FILES)


def apply_database_pass(tuning_db: str | os.PathLike, target):
    """The Relax pass that gives every PrimFunc found in the database its tuned schedule."""
    from tvm import relax

    if not database_exists(tuning_db):
        raise EdgeqError(f"{tuning_db} holds no MetaSchedule database ({', '.join(DATABASE_FILES)}); "
                         "write one with `edgeq tune`")
    return relax.transform.MetaScheduleApplyDatabase(work_dir=str(tuning_db), enable_warning=False)


def _register_build() -> None:
    """Builder worker initializer: a build function without the slow tensor-intrinsic import."""
    import tvm

    def build(mod, target, _params):
        return tvm.compile(mod, target=target)

    tvm.register_global_func(_BUILD_FUNC, build, override=True)


def tunable_tasks(mod, target):
    """MetaSchedule tasks of ``mod`` after edgeq's pre-scheduling passes, hand-scheduled kernels left out."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import meta_schedule as ms

    from edgeq.lower.passes.float_kernels import FloatKernels
    from edgeq.lower.pipeline import is_scheduled, keep_kernels_opaque

    from tvm import relax

    with target:
        mod = tvm.transform.Sequential(
            [FloatKernels(target), relax.transform.FastMathTransform(), keep_kernels_opaque]
            + cpu_generic.legalize_passes(target))(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not any(is_scheduled(f) for f in t.dispatched[0].functions.values())]


def tune_module(mod, target, database: str | os.PathLike, *, trials: int = 64, seed: int = 0,
                progress=None) -> TuneResult:
    """Tune ``mod``'s generic PrimFuncs for ``target`` with at most ``trials`` measured candidates in all."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgeq.lower.kernels.micro import as_target

    target = as_target(target)
    if target.kind.name != "llvm":
        raise EdgeqError(f"edgeq tune measures on this machine and tunes CPU (llvm) targets only, not "
                         f"{target.kind.name}")
    host_triple = tvm.target.codegen.llvm_get_system_triple()
    triple = str(target.attrs.get("mtriple", "") or host_triple)
    if triple.split("-")[0] != host_triple.split("-")[0]:
        raise EdgeqError(f"edgeq tune measures candidates on this machine ({host_triple}); tuning for {triple} "
                         "would need MetaSchedule's RPC runner on the board, which edgeq does not drive yet")
    if trials < 1:
        raise EdgeqError(f"--trials must be at least 1, got {trials}")
    tasks = tunable_tasks(mod, target)
    database = Path(database)
    database.mkdir(parents=True, exist_ok=True)
    if not tasks:
        ms.database.JSONDatabase(work_dir=str(database))  # an empty, valid database
        return TuneResult(database, 0, 0, 0)
    contexts, weights = [], []
    for i, task in enumerate(tasks):
        # no mutators: creating them (MutateComputeLocation, MutateParallel) crashed with this tvm-ffi
        space = ms.space_generator.PostOrderApply(sch_rules="from-target", postprocs="from-target", mutator_probs={})
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=target, space_generator=space,
                                       search_strategy="replay-trace", task_name=task.task_name,
                                       rand_state=seed + i, num_threads="physical"))
        weights.append(float(task.weight))
    builder = ms.builder.LocalBuilder(f_build=_BUILD_FUNC, initializer=_register_build, timeout_sec=300.0,
                                      max_workers=1)
    with tempfile.TemporaryDirectory(prefix="edgeq-tune-") as logs:
        db = ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=logs, max_trials_global=trials,
                                num_trials_per_iter=min(16, trials), builder=builder, runner="local",
                                database=ms.database.JSONDatabase(work_dir=str(database)), cost_model="random",
                                task_scheduler="round-robin")
    return TuneResult(database, len(tasks), trials, len(db.get_all_tuning_records()))


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    from edgeq.lower.relax_import import import_onnx
    from edgeq.targets import load_target

    mod = import_onnx(spec["onnx"], batch=1)
    if spec.get("integer"):
        from edgeq.lower.integer import lower_integer

        mod = lower_integer(mod, load_target(spec["target"]).tvm_target())
    result = tune_module(mod, load_target(spec["target"]).tvm_target(), spec["database"], trials=spec["trials"],
                         seed=spec["seed"])
    print(json.dumps({"tasks": result.tasks, "records": result.records}))
    return 0


def tune_onnx(onnx_path: str | os.PathLike, target: str, database: str | os.PathLike, *, trials: int = 64,
              integer: bool = False, seed: int = 0, timeout: float | None = None) -> TuneResult:
    """Tune the model in an ONNX file (float, or QDQ with ``integer``) in a child process; see :func:`tune_module`."""
    from edgeq.targets import load_target

    load_target(target)  # a bad target name fails here, with the known boards listed
    if not Path(onnx_path).is_file():
        raise EdgeqError(f"no ONNX model at {onnx_path}")
    database = Path(database)
    with tempfile.TemporaryDirectory(prefix="edgeq-tune-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"onnx": str(onnx_path), "target": str(target), "database": str(database),
                                    "trials": int(trials), "integer": integer, "seed": seed}))
        proc = subprocess.run([sys.executable, "-c", "import sys, edgeq.tune as t; sys.exit(t._child(sys.argv[1]))",
                               str(spec)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        if proc.returncode < 0:
            import tvm_ffi

            raise EdgeqError(f"MetaSchedule crashed (signal {-proc.returncode}) while tuning {onnx_path}: TVM 0.27's "
                             f"MetaSchedule is known to crash setting up its search with apache-tvm-ffi "
                             f"{getattr(tvm_ffi, '__version__', '?')} (0.1.14 worked); builds without a tuning "
                             "database are not affected")
        prefix = "edgeq: error: "
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise EdgeqError(f"tuning {onnx_path} failed: {last[len(prefix):] if last.startswith(prefix) else last}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return TuneResult(database, info["tasks"], int(trials), info["records"])
