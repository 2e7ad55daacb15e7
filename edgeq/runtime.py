"""Running an artifact's libraries: on this machine (:class:`HostModel`) and on a board over RPC (:class:`RemoteModel`).

Both share one calling convention, ``model(x) -> logits`` on float32 numpy arrays of whole batches (the library's
fixed batch size, the manifest's ``batch``), so build, deploy, check and profile compare them image by image
with :func:`outputs_agree`: bit for bit for integer builds, within the manifest's ``atol`` for float builds.

The board helpers (:func:`open_board`, :func:`check_board_matches`) open a session for an artifact and refuse a
board of another architecture before anything is uploaded.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgeq.compile.artifact import Artifact
from edgeq.errors import ArtifactTargetMismatchError, TargetError
from edgeq.boards.background import list_boards
from edgeq.boards.session import BoardInfo, BoardSession, connect
from edgeq.compile.targets import TargetSpec, list_targets, load_target


def artifact_target(artifact: Artifact) -> TargetSpec:
    """The target the artifact was built for: its board file when edgeq knows the name, else its TVM JSON."""
    target = artifact.target
    name = target.name or ""
    if name in list_targets():
        return load_target(name)
    tvm_json = dict(target.tvm or {})
    if target.host:
        tvm_json["host"] = target.host
    try:
        return load_target(json.dumps(tvm_json))
    except TargetError as err:
        raise TargetError(f"artifact {artifact.dir} names target {name!r} that this edgeq cannot resolve: "
                          f"{err}") from None


# --- batches and comparisons -------------------------------------------------------------------------------------

def batches(inputs: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)``: consecutive slices of ``batch`` rows (the library's fixed batch size); a ragged tail is
    left out."""
    for start in range(0, len(inputs) - batch + 1, batch):
        yield start, inputs[start:start + batch]


def outputs_agree(got: np.ndarray, expected: np.ndarray, exact: bool, atol: float) -> bool:
    """Whether two outputs are the same: bit for bit when ``exact``, else within ``atol``."""
    if got.shape != expected.shape:
        return False
    return bool(np.array_equal(got, expected)) if exact else bool(np.allclose(got, expected, rtol=0.0, atol=atol))


def max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference (infinite when the shapes differ)."""
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got.astype("float64") - expected).max())


# --- the runners -------------------------------------------------------------------------------------------------

class HostModel:
    """A library built for this machine (the artifact's reference, or a build's own) in a Relax VM here:
    ``model(x)`` runs the entry function on every ``batch`` rows of ``x`` and returns their outputs in order."""

    def __init__(self, library: str | os.PathLike, *, entry: str = "main", batch: int = 1):
        os.environ.setdefault("TVM_BIND_THREADS", "0")  # pinned workers fight the other processes on this host
        import tvm
        from tvm import relax

        self._tensor = tvm.runtime.tensor
        self.library = Path(library)
        self.batch = batch
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        self._entry = self.vm[entry]

    @classmethod
    def of(cls, artifact: Artifact) -> "HostModel":
        """The artifact's reference library (``host.so``, or ``model.so`` for host builds)."""
        return cls(artifact.host_library, entry=artifact.manifest.entry, batch=artifact.manifest.batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if len(x) % self.batch:
            raise ValueError(f"{len(x)} inputs are not whole batches of {self.batch}")
        outs = [self._entry(self._tensor(np.ascontiguousarray(rows), self.device)).numpy()
                for _, rows in batches(x, self.batch)]
        return np.concatenate(outs).astype(np.float32)


class RemoteModel:
    """The artifact's library loaded in a Relax VM on a board: ``model(x)`` runs the entry function there on one
    batch."""

    def __init__(self, session: BoardSession, artifact: Artifact, spec: TargetSpec | None = None):
        self.session = session
        self.artifact = artifact
        self.spec = spec or artifact_target(artifact)
        self.entry = artifact.manifest.entry
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


# --- boards ------------------------------------------------------------------------------------------------------

def check_board_matches(artifact: Artifact, board: BoardInfo, where: str) -> None:
    """:class:`ArtifactTargetMismatchError` (72) when the board's architecture is not the artifact's."""
    wanted = artifact.target.arch
    if board.arch is not None and wanted and board.arch != wanted:
        raise ArtifactTargetMismatchError(
            f"artifact {artifact.dir} is built for {artifact.target.name} ({wanted}), but the board at "
            f"{where} is {board.describe()}: rebuild with `edgeq build --target` for the board"
        )


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
    session = connect(rpc, tracker, key, default_key=artifact.target.rpc_key or None, env=env, timeout=timeout)
    try:
        check_board_matches(artifact, session.info(), session.address.describe())
    except BaseException:
        session.close()
        raise
    return session
