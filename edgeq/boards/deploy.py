"""Deploy a build artifact to a board over TVM RPC and check it against its golden batch.

``deploy_artifact("build/NAME", rpc="HOST:PORT")`` verifies the artifact's hashes (:func:`edgeq.compile.artifact.load_artifact`),
compares the board's architecture with the artifact's target, uploads ``model.so``, loads it in a Relax VM on the
board, runs the golden inputs and compares the outputs with the expected ones: bit for bit for integer builds,
within the manifest's ``atol`` for float builds.

The board runs the library through :class:`edgeq.runtime.RemoteModel`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from edgeq.compile.artifact import Artifact, load_artifact
from edgeq.boards.session import BoardSession
from edgeq.runtime import (
    RemoteModel, batches, board_info_json, check_board_matches, describe_session, max_abs_diff, open_board,
    outputs_agree,
)


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
        exact, atol, batch = artifact.exact, artifact.manifest.atol, artifact.manifest.batch
        matched = count = 0
        worst = 0.0
        mismatches: list[dict[str, Any]] = []
        run_seconds = 0.0
        for start, x in batches(inputs, batch):
            began = time.monotonic()
            got = model(x)
            run_seconds += time.monotonic() - began
            want = expected[start:start + batch]
            diff = max_abs_diff(got, want)
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
            target=str(artifact.target.name), board=describe_session(session),
            board_info=board_info_json(info), emulated=info.emulated, exact=exact, atol=atol,
            golden_count=count, matched=matched, max_abs_diff=worst, mismatches=mismatches,
            upload_load_seconds=upload_load, run_seconds_per_batch=run_seconds / max(1, count // batch),
        )
    finally:
        if own_session:
            session.close()
