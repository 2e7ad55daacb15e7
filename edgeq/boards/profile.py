"""Latency and accuracy per bit plan on a board: ``edgeq profile --target rasp4 --plans a.json b.json ...``.

For each plan: build an artifact (:func:`edgeq.compile.build.build_artifact`), deploy it (golden batch must match),
time the entry function on the board with TVM's ``time_evaluator`` (explicit warm-up calls, then ``repeat``
timed calls in up to :data:`MAX_ROUNDS` rounds, one ``time_evaluator`` call each, so a progress bar can follow a
slow board; median and p90 over every run), and check accuracy (on-device
top-1 on ``--data``/``--limit`` images and agreement with the host library, else the build's host-library top-1).

Results go to ``OUT/results.json`` and ``OUT/results.csv``, rewritten atomically after every measured plan, so
a board that dies mid-profile leaves every row measured so far; rerunning the same command skips plans whose
``plan_hash`` (bits, model, target, quantization method, calibration) already has a row. ``OUT/pareto.png``
plots accuracy against latency with point size proportional to weight bytes.

With several boards registered under one tracker key, one worker per board measures plans in parallel while
this process builds the next ones. Timings from an emulated board (qemu-user) are labelled ``emulated`` in every
output: they say nothing about a real board's latency.

Per-operator timing (``--per-op``): TVM 0.27's Relax VM has no profiler, so each integer kernel (``call_tir``
PrimFunc of the lowered program) is built on its own for the target and timed on the board with
``time_evaluator`` on random inputs of its shapes; the rest of the program (norms, softmax, copies) is
``base_ms`` = whole-model median minus the kernels. These per-layer times make the planner's latency table
(``--latency-table``, :mod:`edgeq.plan.latency` format).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import datetime as _dt
import hashlib
import io
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edgeq.compile.build import BuildConfig
from edgeq.errors import EdgeqError, RemoteRunError, RemoteUnreachableError
from edgeq.fileio import atomic_write_json, atomic_write_text, read_json, replace_unless_interrupted

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PARETO_PNG = "pareto.png"
FORMAT = "edgeq.profile"
VERSION = 1
#: CSV columns, in order (results.json rows hold these and a few more)
CSV_COLUMNS = (
    "plan", "plan_hash", "bits", "avg_w_bits", "avg_a_bits", "weight_bytes", "timing", "latency_median_ms",
    "latency_p90_ms", "latency_min_ms", "repeat", "accuracy_top1", "accuracy_source", "host_top1", "agreement",
    "golden", "board", "artifact", "measured_at",
)

#: the most ``time_evaluator`` calls one plan's timing is split into (each call runs and discards one more call
#: before it times its runs: see :func:`timing_rounds`)
MAX_ROUNDS = 10

#: a build stage that counts its steps (calibration, reconstruction, accuracy) is reported again after this long
STAGE_LINE_SECONDS = 20.0

Log = Callable[[str], None]
#: ``progress(step, done, total)`` of one plan's measurement on the board
StepProgress = Callable[[str, int, int], None]
#: ``progress(plan, step, done, total)`` of a whole profile, plans measured in parallel
PlanProgress = Callable[[str, str, int, int], None]


def _quiet(_: str) -> None:
    pass


def _no_progress(*_: Any) -> None:
    pass


@dataclass
class ProfileConfig:
    """What ``edgeq profile`` measures, and where."""

    #: how every plan is built (target, model, weights, calibration, method, build-time accuracy); each plan's
    #: build takes its ``plan`` from :attr:`plans`
    build: BuildConfig
    plans: Sequence[str | os.PathLike]
    out: str | os.PathLike
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    env: Mapping[str, str] | None = None
    repeat: int = 10
    warmup: int = 2
    min_repeat_ms: int = 0
    data: str | None = None
    limit: int | None = None
    per_op: bool = False
    latency_table: str | os.PathLike | None = None


# ---------------------------------------------------------------------------------------------------------------
# Plans and their identity


def plan_identity(config: ProfileConfig, plan_json: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that changes the built program or its accuracy; provenance (free-form notes) does not."""
    bits = {k: v for k, v in plan_json.items() if k != "provenance"}
    build = config.build
    return {"bits": bits, "model": build.model, "checkpoint": str(build.checkpoint or ""),
            "random_init": build.random_init, "target": build.target, "method": build.method,
            "calib": [str(build.calib or ""), build.calib_count, build.calib_seed]}


def plan_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def bits_summary(plan_json: Mapping[str, Any], layers: Mapping[str, Any] | None = None) -> tuple[str, float, float]:
    """``("w8a8" or "mixed", average weight bits, average activation bits)`` over the artifact's layers."""
    default = plan_json.get("default", {})
    table = dict(layers or {}) or dict(plan_json.get("layers", {}))
    widths = [(int(b["w"]), int(b["a"])) for b in table.values()] or [(int(default["w"]), int(default["a"]))]
    avg_w = sum(w for w, _ in widths) / len(widths)
    avg_a = sum(a for _, a in widths) / len(widths)
    uniform = len(set(widths)) == 1
    return (f"w{widths[0][0]}a{widths[0][1]}" if uniform else "mixed"), round(avg_w, 3), round(avg_a, 3)


@dataclass
class PlanJob:
    path: Path
    hash: str
    plan_json: dict[str, Any]
    artifact: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Results files


class ResultsBook:
    """``results.json`` / ``results.csv`` in the output folder: rows appended one at a time, written atomically."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out = out
        self.lock = threading.Lock()
        self.rows: list[dict[str, Any]] = []
        existing = out / RESULTS_JSON
        previous: dict[str, Any] = {}
        if existing.exists() or existing.is_symlink():  # a dangling link or a device is refused, not replaced
            data = read_json(existing, EdgeqError, "profile results file")
            try:
                self.rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
                previous = dict(data.get("header") or {})
            except (ValueError, AttributeError, TypeError):
                raise EdgeqError(f"{existing} is not a profile results file; choose another --out") from None
        for key in ("model", "target"):
            if previous.get(key) not in (None, header.get(key)):
                raise EdgeqError(f"{existing} holds results for {key} {previous[key]!r}, not {header.get(key)!r}: "
                                 "choose another --out")
        self.header = {**header, "created": previous.get("created", header.get("created"))}

    def done(self) -> set[str]:
        return {r.get("plan_hash") for r in self.rows}

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows = [r for r in self.rows if r.get("plan_hash") != row.get("plan_hash")] + [row]
            self.write()

    def write(self) -> None:
        atomic_write_json(self.out / RESULTS_JSON, {"format": FORMAT, "version": VERSION, "header": self.header,
                                                     "rows": self.rows})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        atomic_write_text(self.out / RESULTS_CSV, text.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Measuring one artifact on one board


def timing_rounds(repeat: int, max_rounds: int = MAX_ROUNDS) -> list[int]:
    """Timed runs per round: ``repeat`` split into at most ``max_rounds`` rounds differing by at most one run."""
    rounds = max(1, min(repeat, max_rounds))
    size, extra = divmod(max(repeat, 1), rounds)
    return [size + (1 if i < extra else 0) for i in range(rounds)]


def time_in_rounds(model, x, config: ProfileConfig, progress: StepProgress = _no_progress) -> list[float]:
    """Seconds of ``config.repeat`` timed runs of ``model(x)``, one ``time_evaluator`` call per round (see
    :func:`timing_rounds`) so that a slow board shows its progress round by round; every run's own time is kept,
    so the statistics are those of one call with ``repeat`` runs."""
    sizes = timing_rounds(config.repeat)
    seconds: list[float] = []
    for i, size in enumerate(sizes):
        seconds += model.time(x, number=1, repeat=size, min_repeat_ms=config.min_repeat_ms)
        progress("timing", i + 1, len(sizes))
    return seconds


def measure_artifact(artifact, session, config: ProfileConfig,
                     progress: StepProgress = _no_progress) -> dict[str, Any]:
    """Deploy (golden batch), time and check one artifact (an :class:`edgeq.compile.artifact.Artifact` or its directory)
    on an open session; the row's measured fields. ``progress(step, done, total)`` follows the warm-up calls, the
    timing rounds and the board's accuracy check."""
    from edgeq.compile.artifact import Accuracy, Artifact, load_artifact
    from edgeq.boards.check import check_on_board
    from edgeq.boards.deploy import deploy_artifact
    from edgeq.runtime import RemoteModel, board_info_json, describe_session

    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    model = RemoteModel(session, artifact)
    deployed = deploy_artifact(artifact, session=session, model=model)
    inputs, _ = artifact.golden()
    manifest = artifact.manifest
    x = inputs[:manifest.batch]
    warmup = max(0, config.warmup)
    for i in range(warmup):
        model(x)
        progress("warm-up", i + 1, warmup)
    ms = np.array(time_in_rounds(model, x, config, progress)) * 1e3
    info = session.info()
    row: dict[str, Any] = {
        "artifact": str(artifact.dir),
        "timing": "emulated" if info.emulated else "board",
        "latency_median_ms": round(float(np.median(ms)), 4),
        "latency_p90_ms": round(float(np.percentile(ms, 90)), 4),
        "latency_min_ms": round(float(ms.min()), 4),
        "latency_all_ms": [round(float(v), 4) for v in ms],
        "repeat": len(ms),
        "golden": f"{deployed.matched}/{deployed.golden_count} " + ("exact" if deployed.exact else "within atol"),
        "golden_ok": deployed.ok,
        "board": describe_session(session),
        "board_info": board_info_json(info),
        "weight_bytes": int(manifest.weights.bytes or 0) if manifest.weights is not None else 0,
    }
    if config.data:
        checked = check_on_board(artifact, session, config.data, config.limit, model=model,
                                 progress=lambda done, total: progress("checking accuracy", done, total))
        row.update(accuracy_top1=checked.device_top1, host_top1=checked.host_top1,
                   accuracy_source=f"board, {checked.images} images of {config.data}",
                   agreement=checked.to_json()["agreement"], check=checked.to_json())
    else:
        accuracy = manifest.accuracy or Accuracy()
        row.update(accuracy_top1=accuracy.compiled_top1, host_top1=accuracy.compiled_top1,
                   accuracy_source=f"host library at build, {accuracy.images} images of {accuracy.data}",
                   agreement="golden " + ("exact" if deployed.ok and deployed.exact else
                                          "ok" if deployed.ok else "mismatch"))
    if config.per_op:
        from edgeq.boards.profile_ops import time_kernels

        try:
            row["per_op"] = time_kernels(artifact, session, repeat=config.repeat, total_ms=row["latency_median_ms"])
        except RemoteRunError:
            raise
        except Exception as err:  # noqa: BLE001 - the plan's latency and accuracy stand without it
            from edgeq.interrupt import raise_if_interrupted

            raise_if_interrupted()  # a Ctrl-C that TVM turned into an error is not a kernel's failure
            row["per_op_error"] = f"{type(err).__name__}: {err}"
    return row


# ---------------------------------------------------------------------------------------------------------------
# The profile run


def count_boards(config: ProfileConfig) -> int:
    """How many boards can measure at once: those registered under the key at a tracker, else one."""
    from edgeq.boards.session import resolve_address, tracker_keys
    from edgeq.compile.targets import load_target

    address = resolve_address(config.rpc, config.tracker, config.key,
                              default_key=load_target(config.build.target).rpc_key, env=config.env)
    if not address.via_tracker:
        from edgeq.boards.session import check_listening

        check_listening(address.host, address.port, 10.0, address.describe())  # fail before any build
        return 1
    keys = tracker_keys(address.host, address.port)
    if address.key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise RemoteUnreachableError(f"no board with key {address.key!r} is registered at the tracker "
                                     f"{address.host}:{address.port} (registered keys: {known})")
    return max(1, keys[address.key])


def read_plan_json(path: Path) -> dict[str, Any]:
    from edgeq.bitplan import read_plan

    return read_plan(path).to_json()


def build_plan(job: PlanJob, config: ProfileConfig, out: Path, log: Log) -> Path:
    """The plan's artifact under ``OUT/artifacts/``: reused when a verified one of the same plan exists."""
    from edgeq.compile.artifact import load_artifact
    from edgeq.compile.build import build_artifact
    from edgeq.errors import ArtifactError

    folder = out / "artifacts" / f"{job.path.stem}-{job.hash[:8]}"
    if folder.exists():
        try:
            load_artifact(folder)
            log(f"{job.path.name}: reusing the artifact {folder}")
            return folder
        except ArtifactError:
            pass  # an unfinished or damaged one: build_artifact replaces it
    log(f"{job.path.name}: building for {config.build.target}")
    started = time.monotonic()
    # with --data the board's accuracy is measured on those images: the build's own evaluation would repeat it
    skip_eval = {"eval_limit": 0} if config.data else {}
    stages: list[str] = []
    last_line = [started]

    def stage_line(stage: str, done, total) -> None:  # a build takes minutes: say which stage it is in
        now = time.monotonic()
        if not stages or stages[-1] != stage:
            stages.append(stage)
            log(f"{job.path.name}: {stage} ({now - started:.0f} s)")
            last_line[0] = now
        elif total and done is not None and now - last_line[0] >= STAGE_LINE_SECONDS:
            log(f"{job.path.name}: {stage} {done}/{total} ({now - started:.0f} s)")  # a long stage that counts
            last_line[0] = now

    build_artifact(dataclasses.replace(config.build, plan=str(job.path), **skip_eval), folder, progress=stage_line)
    log(f"{job.path.name}: built in {time.monotonic() - started:.0f} s")
    return folder


def _row_base(job: PlanJob, manifest) -> dict[str, Any]:
    bits, avg_w, avg_a = bits_summary(job.plan_json, manifest.bits.layers)
    return {"plan": str(job.path), "plan_hash": job.hash, "name": manifest.name, "bits": bits,
            "avg_w_bits": avg_w, "avg_a_bits": avg_a, "target": manifest.target.name}


@dataclass
class ProfileOutcome:
    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    out: Path = Path(".")
    boards: int = 1


def profile_plans(config: ProfileConfig, log: Log = _quiet, progress: PlanProgress = _no_progress) -> ProfileOutcome:
    """Run the profile (see module doc); ``progress(plan, step, done, total)`` follows each plan's warm-up, timing
    rounds and accuracy check on its board (from the boards' threads). Raises :class:`RemoteRunError` (71) when a board dies, after writing
    every row measured before; :class:`RemoteUnreachableError` (70) when no board answers; :class:`OutputBusyError`
    (4) at once when another edgeq process profiles into the same ``--out``."""
    from edgeq.fileio import exclusive_output

    with exclusive_output(Path(config.out), "--out"):
        return _profile_holding_lock(config, log, progress)


def _profile_holding_lock(config: ProfileConfig, log: Log, progress: PlanProgress) -> ProfileOutcome:
    from edgeq.compile.artifact import load_artifact
    from edgeq.boards.session import connect
    from edgeq.compile.targets import load_target

    spec = load_target(config.build.target)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in config.plans:
        path = Path(path)
        plan_json = read_plan_json(path)
        jobs.append(PlanJob(path, plan_hash(plan_identity(config, plan_json)), plan_json))
    header = {"model": config.build.model, "target": spec.name, "created": _now(),
              "note": "timing 'emulated' = qemu-user on this machine, not board latency"}
    book = ResultsBook(out, header)
    done = book.done()
    todo = [job for job in jobs if job.hash not in done]
    skipped = [str(job.path) for job in jobs if job.hash in done]
    for name in skipped:
        log(f"{Path(name).name}: already measured (results.json), skipped")
    if todo and config.data:  # --data that is not there fails now, not after the first build (each build checks
        from edgeq.data.archive import resolve_data_path  # its own inputs before loading the model)

        resolve_data_path(config.data)
    boards = count_boards(config) if todo else 1
    workers = min(boards, len(todo)) if todo else 0
    work: queue.Queue = queue.Queue()
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        session = None
        try:
            while not stop.is_set():
                job = work.get()
                if job is None:
                    return
                if session is None:
                    session = connect(config.rpc, config.tracker, config.key, default_key=spec.rpc_key,
                                      env=config.env, timeout=120.0)
                log(f"{job.path.name}: measuring on {session.server[0]}:{session.server[1]}")
                artifact = load_artifact(job.artifact)
                steps = functools.partial(progress, job.path.name)
                row = {**_row_base(job, artifact.manifest), **measure_artifact(artifact, session, config, steps),
                       "measured_at": _now()}
                book.add(row)
                log(f"{job.path.name}: {row['latency_median_ms']:.3f} ms median ({row['timing']}), "
                    f"top-1 {row['accuracy_top1']}")
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures.append(err)
            stop.set()
        finally:
            if session is not None:
                session.close()

    threads = [threading.Thread(target=worker, name=f"edgeq-profile-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for job in todo:
            if stop.is_set():
                break
            job.artifact = build_plan(job, config, out, log)
            work.put(job)
    finally:
        for _ in threads:
            work.put(None)
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        if book.rows:
            book.write()
            draw_pareto(book.rows, out / PARETO_PNG, title=f"{config.build.model} on {spec.name}")
    if failures:
        error = failures[0]
        if isinstance(error, RemoteRunError):
            raise RemoteRunError(f"{error} ({len(book.rows)} plan(s) measured so far are kept in "
                                 f"{out / RESULTS_JSON}; rerun the same command to resume)") from error
        raise error
    if config.latency_table is not None:
        write_latency_table(book.rows, config, Path(config.latency_table))
    return ProfileOutcome(rows=book.rows, skipped=skipped, out=out, boards=boards)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a text table; emulated timings say so in their own column and in a footnote."""
    head = ["plan", "bits", "avg w", "weights", "median ms", "p90 ms", "timing", "top-1 %", "agreement"]
    body = []
    for r in rows:
        top1 = r.get("accuracy_top1")
        body.append([Path(str(r.get("plan", ""))).name, str(r.get("bits")), f"{r.get('avg_w_bits', 0):.2f}",
                     f"{(r.get('weight_bytes') or 0) / 1024:.1f} KiB", f"{r.get('latency_median_ms', 0):.3f}",
                     f"{r.get('latency_p90_ms', 0):.3f}", str(r.get("timing")),
                     "-" if top1 is None else f"{top1:.2f}", str(r.get("agreement"))])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    if any(r.get("timing") == "emulated" for r in rows):
        lines.append("timing 'emulated': measured under qemu-user emulation on this machine, NOT board latency")
    return "\n".join(lines)


def draw_pareto(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Accuracy (top-1) against median latency, one point per plan, area proportional to weight bytes; the
    Pareto front (no other plan both faster and more accurate) is joined by a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [r for r in rows if r.get("accuracy_top1") is not None and r.get("latency_median_ms") is not None]
    fig = Figure(figsize=(7.5, 5.0), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    emulated = any(r.get("timing") == "emulated" for r in rows)
    if points:
        sizes = np.array([float(r.get("weight_bytes") or 0) for r in points])
        scale = 600.0 / sizes.max() if sizes.max() > 0 else 0.0
        xs = [r["latency_median_ms"] for r in points]
        ys = [r["accuracy_top1"] for r in points]
        ax.scatter(xs, ys, s=40 + sizes * scale, alpha=0.6, edgecolors="black")
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"{Path(str(r['plan'])).stem} ({r.get('bits')}, {(r.get('weight_bytes') or 0) / 1024:.0f} KiB)",
                        (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        front = pareto_front(points)
        ax.plot([r["latency_median_ms"] for r in front], [r["accuracy_top1"] for r in front], "--", color="grey")
    else:
        ax.text(0.5, 0.5, "no plan with both accuracy and latency", ha="center", transform=ax.transAxes)
    ax.set_xlabel("median latency, ms" + (" (EMULATED under qemu: not board latency)" if emulated else ""))
    ax.set_ylabel("top-1, %")
    ax.set_title(title + ("  [emulated timings]" if emulated else "") + "\npoint area ∝ weight bytes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.2)  # room for the labels of the outermost points
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(partial, dpi=110)
    replace_unless_interrupted(partial, path)
    return path


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both latency (lower) and accuracy (higher), by latency."""
    ordered = sorted(rows, key=lambda r: (r["latency_median_ms"], -r["accuracy_top1"]))
    front, best = [], -float("inf")
    for r in ordered:
        if r["accuracy_top1"] > best:
            front.append(r)
            best = r["accuracy_top1"]
    return front


def write_latency_table(rows: Sequence[dict[str, Any]], config: ProfileConfig, path: Path) -> Path:
    """The planner's per-layer latency table (:mod:`edgeq.plan.latency`) from the rows' per-operator times."""
    from edgeq.plan.latency import LatencyTable

    layers: dict[str, dict[tuple[int, int], float]] = {}
    bases = []
    timings = set()
    for r in rows:
        per_op = r.get("per_op")
        if not per_op:
            continue
        timings.add(r.get("timing"))
        bases.append(float(per_op["base_ms"]))
        for layer, entry in per_op["layers"].items():
            layers.setdefault(layer, {})[(int(entry["w"]), int(entry["a"]))] = float(entry["ms"])
    if not layers:
        raise EdgeqError("--latency-table needs per-operator times: add --per-op (rows measured without it have none)")
    table = LatencyTable(model=config.build.model, target=load_target_name(config.build.target), layers=layers,
                         base_ms=round(float(np.median(bases)), 4),
                         extra_header={"timing": "emulated" if "emulated" in timings else "board",
                                       "source": "edgeq profile --per-op", "plans": len(bases)})
    return table.write(path)


def load_target_name(target: str) -> str:
    from edgeq.compile.targets import load_target

    return load_target(target).name
