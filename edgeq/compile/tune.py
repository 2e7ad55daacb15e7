"""``edgeq tune``: MetaSchedule tuning of the PrimFuncs edgeq does not hand-schedule, stored as a database.

edgeq's integer and fp32 GEMM kernels are hand-scheduled and never tuned. What is left after
:func:`edgeq.lower.pipeline.legalizing_passes` -- LayerNorm, Softmax, GELU, residual adds, transposes, activation
quantization -- gets a generic parallel/vectorized schedule; :func:`tune_module` lets MetaSchedule search better
ones for one target within a trial budget and writes its JSON database (``database_workload.json``,
``database_tuning_record.json``) into a directory, by default ``<artifact>.tuning/`` beside the artifact.
``edgeq build --tuning-db DIR`` (``compile_relax(mod, target, tuning_db=DIR)``) then gives every PrimFunc it
finds there its tuned schedule, in the board's library and in the host reference library alike.

Candidates are measured where they will run: on this machine for the host target (``LocalRunner``), on a board
over TVM RPC for any other CPU target (``RPCRunner`` through edgeq's own session opening, so a direct ``--rpc``
server works as well as a tracker). Builder workers compile with the build's exact-float TIR pipeline and link
with the board's cross compiler.

Three things on this kind of machine (``/work/shared/notes/tvm-0.27-facts.md``):

- MetaSchedule segfaults while creating a tuning context with apache-tvm-ffi 0.1.15; 0.1.14.post1 works and is
  what ``pyproject.toml`` pins. Tuning runs in a child process all the same, so a crash inside TVM becomes an
  :class:`EdgeqError` instead of killing the caller.
- ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, which parses some 250 TVMScript intrinsics for every
  backend and took two minutes here (``inspect.stack`` over two thousand loaded modules per intrinsic). The
  generic LLVM rules edgeq tunes with use none of them, so the tuning process gets an empty module in its place.
- The search is ``replay-trace`` with a random cost model: the XGBoost model MetaSchedule learns with is not a
  dependency, and for the small float PrimFuncs tuned here random samples of the design space do as well.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.lower.tuning_database import LOG_FILE, check_database_dir, writing_database
from edgeq.boards.session import RemoteAddress, resolve_address

__all__ = ["TuneResult", "tune_module", "tune_onnx", "tune_source", "tunable_tasks", "default_database"]

_BUILD_FUNC = "edgeq.tune.build"
_EXPORT_FUNC = "edgeq.tune.export"
#: MetaSchedule's run time for a candidate that failed to build or run
_FAILED_RUN = 1e9
#: seconds a board may take to load and time one candidate (an emulated board is slow)
BOARD_SESSION_TIMEOUT = 120


@dataclass
class TuneResult:
    database: Path
    tasks: int
    trials: int
    records: int
    measured_on: str  # "this machine" or the board's address


def default_database(source: Path) -> Path:
    """``build/NAME.tuning`` for an artifact directory ``build/NAME``, ``m.tuning`` for ``m.onnx``."""
    return source.with_name(source.name.removesuffix(".onnx") + ".tuning")


def tune_source(source: Path, target: str | None) -> tuple[Path, str | None, bool]:
    """``(ONNX file, target, integer)`` for what ``edgeq tune`` is given: an artifact directory (its
    ``model.onnx``, its target unless ``target`` names one, whether it is an integer build) or an ONNX file."""
    if not source.is_dir():
        return source, target, False
    from edgeq.compile.artifact import ONNX, load_artifact

    manifest = load_artifact(source, verify=False).manifest
    return source / ONNX, target or manifest.target.name, manifest.precision == "int"


def _register_worker_funcs(target: str) -> None:
    """Builder worker initializer: build as ``edgeq build`` does and link for the board.

    TVM's default build function imports ``tvm.s_tir.tensor_intrin`` (minutes here) and its default export
    writes a tar the board would have to link itself (boards have no compiler)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from edgeq.compile.library import export_library
    from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE
    from edgeq.compile.targets import load_target

    spec = load_target(target)

    def build(mod, tvm_target, _params):
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        # a runtime module: tvm.compile's Executable wrapper does not survive the trip through the FFI
        return tvm.tirx.build(mod, target=tvm_target, pipeline=EXACT_FP_TIR_PIPELINE)

    def export(module) -> str:
        return str(export_library(module, spec, Path(tempfile.mkdtemp(prefix="edgeq-tune-")) / "candidate.so"))

    tvm.register_global_func(_BUILD_FUNC, build, override=True)
    tvm.register_global_func(_EXPORT_FUNC, export, override=True)


def _open_board(board: RemoteAddress, **kwargs):
    """edgeq's session with the board (its address was resolved once, by :func:`tune_onnx`)."""
    from edgeq.boards.session import connect

    where = f"{board.host}:{board.port}"
    if board.via_tracker:
        return connect(tracker=where, key=board.key, **kwargs)
    return connect(rpc=where, **kwargs)


def _board_rpc_session(board: RemoteAddress, _rpc_config):
    """Runner worker: the board's ``tvm.rpc`` session, opened as ``edgeq deploy`` opens it (direct or tracker)."""
    return _open_board(board, session_timeout=BOARD_SESSION_TIMEOUT).rpc


def _board_arguments(_session, device, args_info, alloc_repeat: int):
    """Runner worker: a candidate's inputs, random values made here and copied to the board. TVM's default asks
    the board for ``random_fill``, which a board running TVM's runtime-only library does not have."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(tensor) -> None:
        shape, dtype = tuple(tensor.shape), str(tensor.dtype)
        values = rng.standard_normal(shape) if "float" in dtype else rng.integers(0, 2 if dtype == "bool" else 8, shape)
        tensor.copyfrom(np.asarray(values).astype(dtype))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def tunable_tasks(mod, target):
    """MetaSchedule tasks of ``mod`` after the build's legalization, hand-scheduled kernels left out."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from edgeq.lower.pipeline import is_scheduled, legalizing_passes

    with target:
        mod = tvm.transform.Sequential(legalizing_passes(target))(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not any(is_scheduled(f) for f in t.dispatched[0].functions.values())]


def _runner(board: RemoteAddress | None):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20)
    if board is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    # RPCConfig insists on tracker fields even though edgeq's session opener below is what connects (to a
    # tracker or straight to a server); they name the same address
    config = ms.runner.RPCConfig(tracker_host=board.host, tracker_port=board.port,
                                 tracker_key=board.key or "direct", session_timeout_sec=BOARD_SESSION_TIMEOUT)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                               f_create_session=functools.partial(_board_rpc_session, board),
                               f_alloc_argument=_board_arguments)


def _check_measurable(spec, board: RemoteAddress | None) -> None:
    import tvm

    if spec.tvm_target().kind.name != "llvm":
        raise EdgeqError(f"edgeq tune tunes CPU (llvm) targets only, not {spec.tvm_target().kind.name} ({spec.name})")
    host_arch = tvm.target.codegen.llvm_get_system_triple().split("-")[0]
    if board is None and spec.arch != host_arch:
        raise EdgeqError(f"tuning for {spec.name} ({spec.arch}) measures candidates on the board: give it with "
                         "--rpc HOST:PORT or --rpc-tracker HOST[:PORT] (this machine is "
                         f"{host_arch}; `edgeq board start --emulated` runs an emulated aarch64 board here)")


def tune_module(mod, target: str, database: str | os.PathLike, *, trials: int = 64, seed: int = 0,
                board: RemoteAddress | None = None) -> TuneResult:
    """Tune ``mod``'s generic PrimFuncs for ``target`` (an edgeq target name, tag or JSON) with at most ``trials``
    measured candidates in all, on this machine or on ``board``."""
    from tvm.s_tir import meta_schedule as ms

    from edgeq.compile.targets import load_target

    spec = load_target(target)
    _check_measurable(spec, board)
    if trials < 1:
        raise EdgeqError(f"--trials must be at least 1, got {trials}")
    tvm_target = spec.tvm_target()
    tasks = tunable_tasks(mod, tvm_target)
    database = Path(database)
    database.mkdir(parents=True, exist_ok=True)
    measured_on = "this machine" if board is None else board.describe()
    if not tasks:
        ms.database.JSONDatabase(work_dir=str(database))  # an empty, valid database
        return TuneResult(database, 0, 0, 0, measured_on)
    contexts, weights = [], []
    for i, task in enumerate(tasks):
        # the generic LLVM rules on every CPU: the ARM defaults failed on most candidates (notes), and none of
        # the rules tuned here need a tensor intrinsic
        space = ms.space_generator.PostOrderApply(sch_rules=ms.ScheduleRule.create("llvm"),
                                                  postprocs=ms.Postproc.create("llvm"), mutator_probs={})
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=tvm_target, space_generator=space,
                                       search_strategy="replay-trace", task_name=task.task_name,
                                       rand_state=seed + i, num_threads="physical"))
        weights.append(float(task.weight))
    builder = ms.builder.LocalBuilder(f_build=_BUILD_FUNC, f_export=_EXPORT_FUNC, timeout_sec=300.0, max_workers=1,
                                      initializer=functools.partial(_register_worker_funcs, target))
    log = database / LOG_FILE
    with tempfile.TemporaryDirectory(prefix="edgeq-tune-") as logs, _logging_to(log):
        db = ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=logs, max_trials_global=trials,
                                num_trials_per_iter=_trials_per_round(trials, len(tasks)), builder=builder,
                                runner=_runner(board),
                                database=ms.database.JSONDatabase(work_dir=str(database)), cost_model="random",
                                task_scheduler="round-robin")
    records = db.get_all_tuning_records()
    if not any(r.run_secs and float(r.run_secs[0]) < _FAILED_RUN for r in records):
        raise EdgeqError(f"no candidate built and ran on {measured_on}: {_last_error(log)} (log: {log})")
    return TuneResult(database, len(tasks), trials, len(records), measured_on)


def _trials_per_round(trials: int, tasks: int) -> int:
    """Candidates per task and round: round-robin hands out rounds task by task, so rounds of 16 would spend a
    small budget on the first few tasks and leave the rest untuned; a budget is spread over every task first."""
    return max(1, min(16, trials // tasks))


@contextlib.contextmanager
def _logging_to(path: Path):
    """MetaSchedule's log (every candidate's build and run errors) into ``path``."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _last_error(log: Path) -> str:
    """What the last failed candidate logged: its stage and the last line of its error."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    stage, detail, collecting = None, None, False
    for line in lines:
        found = re.search(r"Error in (building|running):", line)
        if found:
            stage, detail, collecting = found.group(1), None, True
        elif collecting and line.startswith("# from tvm.script"):  # the candidate's program follows the error
            collecting = False
        elif collecting and line.strip():
            detail = line.strip()
    return f"{stage}: {detail}" if stage else "no error was logged"


def _child(spec_path: str) -> int:
    import types

    # see the module doc: TuneContext's import of every backend's tensor intrinsics, unused here
    sys.modules.setdefault("tvm.s_tir.tensor_intrin", types.ModuleType("tvm.s_tir.tensor_intrin"))
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    from edgeq.lower.relax_import import import_onnx
    from edgeq.compile.targets import load_target

    mod = import_onnx(spec["onnx"], batch=1)
    if spec.get("integer"):
        from edgeq.lower.integer import lower_integer

        mod = lower_integer(mod, load_target(spec["target"]).tvm_target())
    try:
        result = tune_module(mod, spec["target"], spec["database"], trials=spec["trials"], seed=spec["seed"],
                             board=RemoteAddress(**spec["board"]) if spec.get("board") else None)
    except EdgeqError as err:
        print(f"edgeq: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"tasks": result.tasks, "records": result.records, "measured_on": result.measured_on}))
    return 0


def _board_reachable(spec, board: RemoteAddress) -> None:
    """Open a session once before the long work: an unreachable or wrong board fails in seconds, in one line."""
    from edgeq.errors import ArtifactTargetMismatchError

    with _open_board(board) as session:
        info = session.info()
        if info.arch is not None and info.arch != spec.arch:
            raise ArtifactTargetMismatchError(f"tuning is for {spec.name} ({spec.arch}), but the board at "
                                              f"{session.address.describe()} is {info.describe()}")


def tune_onnx(onnx_path: str | os.PathLike, target: str, database: str | os.PathLike, *, trials: int = 64,
              integer: bool = False, seed: int = 0, rpc: str | None = None, tracker: str | None = None,
              key: str | None = None, timeout: float | None = None) -> TuneResult:
    """Tune the model in an ONNX file (float, or QDQ with ``integer``) in a child process; see :func:`tune_module`.

    With ``rpc`` (``HOST:PORT``) or ``tracker`` (and ``key``, default the target's) candidates run on that board."""
    from edgeq.compile.targets import load_target

    spec = load_target(target)  # a bad target name fails here, with the known boards listed
    if not Path(onnx_path).is_file():
        raise EdgeqError(f"no ONNX model at {onnx_path}")
    database = Path(database)
    check_database_dir(database)
    board = None
    if rpc or tracker:
        board = resolve_address(rpc, tracker, key, default_key=spec.rpc_key)
        _board_reachable(spec, board)
    _check_measurable(spec, board)
    with writing_database(database) as partial, tempfile.TemporaryDirectory(prefix="edgeq-tune-") as tmp:
        child_spec = Path(tmp) / "spec.json"
        child_spec.write_text(json.dumps({"onnx": str(onnx_path), "target": str(target), "database": str(partial),
                                          "trials": int(trials), "integer": integer, "seed": seed,
                                          "board": asdict(board) if board else None}))
        proc = subprocess.run([sys.executable, "-c", "import sys, edgeq.compile.tune as t; sys.exit(t._child(sys.argv[1]))",
                               str(child_spec)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            _raise_child_failure(proc, onnx_path, partial)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return TuneResult(database, info["tasks"], int(trials), info["records"], info["measured_on"])


def _raise_child_failure(proc: subprocess.CompletedProcess, onnx_path, partial: Path) -> None:
    """The tuning child's failure as one :class:`EdgeqError`; its log, which goes with the partial database, is
    kept in a temporary folder and named."""
    if (partial / LOG_FILE).is_file():
        kept = Path(tempfile.mkdtemp(prefix="edgeq-tune-log-")) / LOG_FILE
        shutil.copyfile(partial / LOG_FILE, kept)
        proc.stderr = proc.stderr.replace(str(partial / LOG_FILE), str(kept))
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode < 0:
        import tvm_ffi

        raise EdgeqError(f"MetaSchedule crashed (signal {-proc.returncode}) while tuning {onnx_path} with "
                         f"apache-tvm-ffi {getattr(tvm_ffi, '__version__', '?')} (0.1.15 is known to crash; "
                         "edgeq pins 0.1.14.post1: rerun ./setup.sh); builds without a tuning database are "
                         "not affected")
    prefix = "edgeq: error: "
    last = lines[-1] if lines else f"exit code {proc.returncode}"
    raise EdgeqError(f"tuning {onnx_path} failed: {last[len(prefix):] if last.startswith(prefix) else last}")
