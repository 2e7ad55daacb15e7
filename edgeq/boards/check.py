"""On-device accuracy and agreement with the host: ``edgeq check build/NAME --data DIR --limit N``.

N validation images (a class-balanced, seeded subset, preprocessed as the manifest's model data config says)
are sent one batch at a time to the board, and the same batch goes through the artifact's reference library on
this machine (``host.so``, or ``model.so`` for host builds). The report gives on-device top-1, host top-1 and
their agreement; integer builds must agree bit for bit and the report says "exact" or lists the first
mismatching images.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from edgeq.compile.artifact import Artifact, load_artifact
from edgeq.errors import ClassCountError
from edgeq.boards.session import BoardSession
from edgeq.runtime import (
    HostModel, RemoteModel, batches, board_info_json, check_board_matches, describe_session, max_abs_diff,
    open_board, outputs_agree,
)

Progress = Callable[[int, int], None]
#: mismatching images listed in a report
MAX_LISTED = 10


def load_images(artifact: Artifact, data, limit: int | None, seed: int = 0):
    """``(dataset, indices)``: the data set preprocessed for the artifact and a balanced subset of ``limit``."""
    from edgeq.data import balanced_indices, load_image_folder

    dataset = load_image_folder(data, artifact.manifest.model.data_config())
    classes = artifact.manifest.model.num_classes
    if classes is not None and int(classes) != len(dataset.classes):
        raise ClassCountError(
            f"data at {dataset.root} has {len(dataset.classes)} classes but {artifact.dir} has {classes} outputs"
        )
    indices = balanced_indices(dataset.labels, limit, seed=seed) if limit else list(range(len(dataset)))
    return dataset, indices


def image_batches(dataset, indices: list[int], batch: int):
    """``(indices, images float32 [batch,3,H,W], labels)`` streamed from disk; a ragged tail is left out."""
    for _, chosen in batches(indices, batch):
        items = [dataset[i] for i in chosen]
        images = np.stack([np.asarray(image, dtype="float32") for image, _ in items])
        yield chosen, images, np.array([label for _, label in items])


@dataclass
class CheckResult:
    artifact: str
    name: str
    precision: str
    target: str
    board: str
    board_info: dict[str, Any]
    emulated: bool
    data: str
    images: int
    device_top1: float
    host_top1: float
    top1_agreement: float  # % of images where board and host pick the same class
    exact: bool  # integer build: outputs must be bit-identical
    atol: float
    outputs_agree: int  # images whose outputs agree (bit-identical, or within atol for float builds)
    max_abs_diff: float
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device_seconds_per_image: float = 0.0

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.outputs_agree == self.images

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok,
                "agreement": "exact" if (self.exact and self.ok) else
                ("within atol" if self.ok else "mismatch")}

    def report(self) -> str:
        timing = "emulated, not board latency" if self.emulated else "board, wall clock over RPC"
        if self.exact:
            verdict = ("exact: every output is bit-identical to the host library" if self.ok else
                       f"NOT exact: {self.images - self.outputs_agree} of {self.images} outputs differ")
        else:
            verdict = (f"all outputs within atol {self.atol:g} of the host library" if self.ok else
                       f"{self.images - self.outputs_agree} of {self.images} outputs beyond atol {self.atol:g}")
        lines = [
            f"checked {self.artifact} ({self.precision}, target {self.target}) on {self.board}",
            f"  board:      {self.board_info.get('describe')}",
            f"  data:       {self.images} images of {self.data}",
            f"  top-1:      board {self.device_top1:.2f} %   host {self.host_top1:.2f} %   "
            f"same class {self.top1_agreement:.2f} %",
            f"  agreement:  {verdict} (max |diff| {self.max_abs_diff:.3g})",
        ]
        for bad in self.mismatches[:5]:
            lines.append(f"    image {bad['index']} ({bad['file']}): max |diff| {bad['max_abs_diff']:.3g}, "
                         f"top-1 board {bad['board_top1']} vs host {bad['host_top1']}")
        lines.append(f"  time:       {self.seconds:.1f} s in all, {self.device_seconds_per_image * 1e3:.1f} ms per "
                     f"image on the board ({timing})")
        return "\n".join(lines)


def check_on_board(
    artifact: Artifact, session: BoardSession, data, limit: int | None, *, progress: Progress | None = None,
    model: RemoteModel | None = None, seed: int = 0,
) -> CheckResult:
    """Run ``limit`` images of ``data`` on the board and on the host library; compare (see module doc)."""
    started = time.monotonic()
    check_board_matches(artifact, session.info(), session.address.describe())
    dataset, indices = load_images(artifact, data, limit, seed=seed)
    remote = model or RemoteModel(session, artifact)
    host = HostModel.of(artifact)
    exact, atol, batch = artifact.exact, artifact.manifest.atol, artifact.manifest.batch
    seen = device_correct = host_correct = same_class = agree = 0
    worst = 0.0
    device_seconds = 0.0
    mismatches: list[dict[str, Any]] = []
    for chosen, images, labels in image_batches(dataset, indices, batch):
        began = time.monotonic()
        got = remote(images)
        device_seconds += time.monotonic() - began
        want = host(images)
        for row, index in enumerate(chosen):
            g, w = got[row], want[row]
            diff = max_abs_diff(g, w)
            worst = max(worst, diff)
            device_correct += int(g.argmax() == labels[row])
            host_correct += int(w.argmax() == labels[row])
            same_class += int(g.argmax() == w.argmax())
            if outputs_agree(g, w, exact, atol):
                agree += 1
            elif len(mismatches) < MAX_LISTED:
                mismatches.append({"index": int(index), "file": str(dataset.samples[index].path),
                                   "max_abs_diff": diff, "board_top1": int(g.argmax()), "host_top1": int(w.argmax()),
                                   "label": int(labels[row])})
        seen += len(chosen)
        if progress is not None:
            progress(seen, len(indices))
    percent = (lambda n: round(100.0 * n / seen, 3)) if seen else (lambda n: 0.0)
    info = session.info()
    return CheckResult(
        artifact=str(artifact.dir), name=artifact.name, precision=artifact.precision,
        target=str(artifact.target.name), board=describe_session(session), board_info=board_info_json(info),
        emulated=info.emulated, data=str(data), images=seen, device_top1=percent(device_correct),
        host_top1=percent(host_correct), top1_agreement=percent(same_class), exact=exact, atol=atol,
        outputs_agree=agree, max_abs_diff=worst, mismatches=mismatches, seconds=round(time.monotonic() - started, 2),
        device_seconds_per_image=device_seconds / seen if seen else 0.0,
    )


def check_artifact(
    path, data, limit: int | None = None, *, rpc: str | None = None, tracker: str | None = None,
    key: str | None = None, env: Mapping[str, str] | None = None, progress: Progress | None = None,
) -> CheckResult:
    """``edgeq check``: load and verify the artifact, open the board, run :func:`check_on_board`."""
    artifact = path if isinstance(path, Artifact) else load_artifact(path)
    with open_board(artifact, rpc=rpc, tracker=tracker, key=key, env=env) as session:
        return check_on_board(artifact, session, data, limit, progress=progress)
