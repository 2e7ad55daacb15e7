"""Deploy a build artifact to a board over TVM RPC and check it against its golden batch.

``deploy_artifact("build/NAME", rpc="HOST:PORT")`` verifies the artifact's hashes (:func:`edgeq.artifact.load_artifact`),
compares the board's architecture with the artifact's target, uploads ``model.so``, loads it in a Relax VM on the
board, runs the golden inputs and compares the outputs with the expected ones: bit for bit for integer builds,
within the manifest's ``atol`` for float builds.

:class:`RemoteModel` (the library running on a board) and :class:`HostModel` (the reference library running
here) share one calling convention, ``model(x) -> logits`` on numpy arrays, so ``check`` and ``profile`` can
compare them image by image.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from edgeq.artifact import Artifact, load_artifact
from edgeq.errors import ArtifactTargetMismatchError, TargetError
from edgeq.remote.background import list_boards
from edgeq.remote.session import BoardInfo, BoardSession, connect
from edgeq.targets import TargetSpec, list_targets, load_target


def artifact_target(artifact: Artifact) -> TargetSpec:
    """The target the artifact was built for: its board file when edgeq knows the name, else its TVM JSON."""
    target = artifact.target
    name = str(target.get("name") or "")
    if name in list_targets():
        return load_target(name)
    tvm_json = dict(target.get("tvm") or {})
    if target.get("host"):
        tvm_json["host"] = target["host"]
    try:
        return load_target(json.dumps(tvm_json))
    except TargetError as err:
        raise TargetError(f"artifact {artifact.dir} names target {name!r} that this edgeq cannot resolve: {err}") from None


def check_board_matches(artifact: Artifact, board: BoardInfo, where: str) -> None:
    """:class:`ArtifactTargetMismatchError` (72) when the board's architecture is not the artifact's."""
    wanted = artifact.target.get("arch")
    if board.arch is not None and wanted and board.arch != wanted:
        raise ArtifactTargetMismatchError(
            f"artifact {artifact.dir} is built for {artifact.target.get('name')} ({wanted}), but the board at "
            f"{where} is {board.describe()}: rebuild with `edgeq build --target` for the board"
        )


class RemoteModel:
    """The artifact's library loaded in a Relax VM on a board: ``model(x)`` runs the entry function there."""

    def __init__(self, session: BoardSession, artifact: Artifact, spec: TargetSpec | None = None):
        self.session = session
        self.artifact = artifact
        self.spec = spec or artifact_target(artifact)
        self.entry = str(artifact.manifest.get("entry", "main"))
        self.device_kind = self.spec.device_kind
        started = time.monotonic()
        self.module = session.load_module(artifact.library, target=self.spec)
        self.load_seconds = time.monotonic() - started
        self.vm = session.vm(self.module, self.device_kind)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(self.vm, self.entry, self.session.tensor(np.ascontiguousarray(x, "float32"),
                                                                        self.device_kind))
        with self.session.remote_step("copying the output back"):
            return out.numpy()

    def time(self, x: np.ndarray, *, number: int = 1, repeat: int = 10, min_repeat_ms: int = 0) -> list[float]:
        """Seconds per call on the board (time_evaluator: one discarded warm-up call, then ``repeat`` values)."""
        arg = self.session.tensor(np.ascontiguousarray(x, "float32"), self.device_kind)
        return self.session.time(self.vm, self.entry, arg, device=self.device_kind, number=number, repeat=repeat,
                                 min_repeat_ms=min_repeat_ms)


class HostModel:
    """The artifact's reference library (``host.so``, or ``model.so`` for host builds) run on this machine."""

    def __init__(self, artifact: Artifact):
        import tvm
        from tvm import relax

        self.entry = str(artifact.manifest.get("entry", "main"))
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.host_library)), self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tvm

        return self.vm[self.entry](tvm.runtime.tensor(np.ascontiguousarray(x, "float32"), self.device)).numpy()


def batches(inputs: np.ndarray, batch: int):
    """Consecutive slices of ``batch`` rows (the library's fixed batch size); a ragged tail is left out."""
    for start in range(0, len(inputs) - batch + 1, batch):
        yield start, inputs[start:start + batch]


def outputs_agree(got: np.ndarray, expected: np.ndarray, exact: bool, atol: float) -> bool:
    if got.shape != expected.shape:
        return False
    return bool(np.array_equal(got, expected)) if exact else bool(np.allclose(got, expected, rtol=0.0, atol=atol))


@dataclass
class DeployResult:
    """What ``edgeq deploy`` found; ``ok`` says whether every golden output matched."""

    artifact: str
    name: str
    precision: str
    target: str
    board: str  # where: "RPC server HOST:PORT" or the tracker and key
    board_info: dict[str, Any]
    emulated: bool
    exact: bool  # comparison mode: bit-exact (int) or within atol (float)
    atol: float
    golden_count: int
    matched: int
    max_abs_diff: float
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    upload_load_seconds: float = 0.0
    run_seconds_per_batch: float = 0.0

    @property
    def ok(self) -> bool:
        return self.golden_count > 0 and self.matched == self.golden_count

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def report(self) -> str:
        """The one-screen text ``edgeq deploy`` prints."""
        mode = "bit-exact (integer build)" if self.exact else f"within atol {self.atol:g} (float build)"
        timing = "emulated, not board latency" if self.emulated else "board"
        lines = [
            f"deployed {self.artifact} ({self.precision}, target {self.target}) to {self.board}",
            f"  board:    {self.board_info.get('describe')}",
            f"  loaded:   upload + load {self.upload_load_seconds:.2f} s; "
            f"{self.run_seconds_per_batch * 1e3:.1f} ms per golden batch ({timing}, wall clock over RPC)",
            f"  golden:   {self.matched}/{self.golden_count} outputs match, {mode}; max |diff| {self.max_abs_diff:.3g}",
        ]
        for bad in self.mismatches[:5]:
            lines.append(f"    mismatch at golden input {bad['index']}: max |diff| {bad['max_abs_diff']:.3g}, "
                         f"top-1 board {bad['board_top1']} vs expected {bad['expected_top1']}")
        lines.append("  result:   " + ("OK" if self.ok else "MISMATCH: the board does not reproduce the build"))
        return "\n".join(lines)


def board_info_json(info: BoardInfo) -> dict[str, Any]:
    return {"arch": info.arch, "bits": info.bits, "cpu": info.cpu, "num_threads": info.num_threads,
            "emulated": info.emulated, "method": info.method, "describe": info.describe()}


def describe_session(session: BoardSession) -> str:
    if session.address.via_tracker:
        return f"board {session.server[0]}:{session.server[1]} via {session.address.describe()}"
    return session.address.describe()


def started_board_address(env: Mapping[str, str] | None = None) -> str | None:
    """With no address given and no tracker in the environment, the one board ``edgeq board start`` left running
    here is the natural target (so the README's main job needs no port juggling); with none or several, None."""
    environ = os.environ if env is None else env
    if environ.get("TVM_TRACKER_HOST"):
        return None
    running = [board for board in list_boards() if board.alive()]
    return running[0].address if len(running) == 1 else None


def open_board(artifact: Artifact, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
               env: Mapping[str, str] | None = None, timeout: float | None = None) -> BoardSession:
    """A session with the board for ``artifact`` (the tracker key defaults to the artifact target's RPC key),
    refused with :class:`ArtifactTargetMismatchError` when the board has another architecture."""
    if rpc is None and tracker is None:
        rpc = started_board_address(env)
    session = connect(rpc, tracker, key, default_key=artifact.target.get("rpc_key") or None, env=env,
                      timeout=timeout)
    try:
        check_board_matches(artifact, session.info(), session.address.describe())
    except BaseException:
        session.close()
        raise
    return session


def deploy_artifact(
    path, *, rpc: str | None = None, tracker: str | None = None, key: str | None = None,
    env: Mapping[str, str] | None = None, session: BoardSession | None = None, model: "RemoteModel | None" = None,
) -> DeployResult:
    """Verify, upload, load and run the golden batch of the artifact at ``path`` on a board (see module doc).

    ``session``: an open session to use (left open); ``model``: the artifact already loaded there."""
    artifact = path if isinstance(path, Artifact) else load_artifact(path)
    own_session = session is None
    if session is None:
        session = open_board(artifact, rpc=rpc, tracker=tracker, key=key, env=env)
    else:
        check_board_matches(artifact, session.info(), session.address.describe())
    try:
        info = session.info()
        model = model or RemoteModel(session, artifact)
        upload_load = model.load_seconds
        inputs, expected = artifact.golden()
        exact = artifact.exact
        atol = float(artifact.manifest["golden"].get("atol", 0.0) or 0.0)
        batch = int(artifact.manifest.get("batch", 1))
        matched = count = 0
        worst = 0.0
        mismatches: list[dict[str, Any]] = []
        run_seconds = 0.0
        for start, x in batches(inputs, batch):
            began = time.monotonic()
            got = model(x)
            run_seconds += time.monotonic() - began
            want = expected[start:start + batch]
            diff = float(np.abs(got.astype("float64") - want).max()) if got.shape == want.shape else float("inf")
            worst = max(worst, diff)
            count += len(x)
            if outputs_agree(got, want, exact, atol):
                matched += len(x)
            else:
                mismatches.append({"index": start, "max_abs_diff": diff,
                                   "board_top1": int(got.reshape(len(x), -1)[0].argmax()),
                                   "expected_top1": int(want.reshape(len(x), -1)[0].argmax())})
        return DeployResult(
            artifact=str(artifact.dir), name=artifact.name, precision=artifact.precision,
            target=str(artifact.target.get("name")), board=describe_session(session),
            board_info=board_info_json(info), emulated=info.emulated, exact=exact, atol=atol,
            golden_count=count, matched=matched, max_abs_diff=worst, mismatches=mismatches,
            upload_load_seconds=upload_load, run_seconds_per_batch=run_seconds / max(1, count // batch),
        )
    finally:
        if own_session:
            session.close()
