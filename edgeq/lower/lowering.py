"""Lowering is one call: :func:`lower_model` takes an exported ONNX file to a compiled module for one target.

``lower_model(onnx_path, target, precision, tuning_db=...)`` imports the file into Relax
(:func:`~edgeq.lower.relax_import.import_onnx`), rewrites the quantized layers of an integer export into integer
kernels (:func:`~edgeq.lower.integer.lower_integer`) and compiles the result with edgeq's pipeline
(:func:`~edgeq.lower.pipeline.lower_relax`), applying the tuning database when one is given. ``edgeq build``
compiles the board's and the host's library with it, and ``edgeq profile --per-op`` takes the same call with
``schedule_only`` (the scheduled module whose PrimFuncs it times), given the artifact's tuning database, so the
PrimFuncs it times carry the schedules the board's library has.

The database is checked once, here (:meth:`~edgeq.lower.tuning_database.TuningDatabase.open`, unless the caller
opened it already to fail before long work), and what it gave comes back in :class:`Lowered` with the rest of
what was applied: the target, the integer kernel family.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from edgeq.lower.tuning_database import TuningApplied, TuningDatabase
from edgeq.compile.targets import TargetSpec, load_target

__all__ = ["Lowered", "lower_model", "PRECISIONS"]

PRECISIONS = ("int", "float")


@dataclass(frozen=True)
class Lowered:
    """What :func:`lower_model` made and what it applied."""

    spec: TargetSpec
    precision: str                   # "int" | "float"
    relax: Any                       # the imported (and integer-lowered) Relax module, before scheduling
    module: Any                      # a tvm.relax.Executable, or with schedule_only the scheduled IRModule
    tuning: Optional[TuningApplied]  # the database and the PrimFuncs it scheduled; None without one
    kernel_family: str               # the integer kernels' family (edgeq.lower.kernels.micro.kernel_family)

    def tuning_entry(self) -> Optional[dict[str, Any]]:
        """The manifest's ``tuning`` entry (None without a database)."""
        return self.tuning.entry() if self.tuning is not None else None


def lower_model(onnx_path: str | os.PathLike, target: str | TargetSpec, precision: str = "int", *,
                tuning_db: str | os.PathLike | TuningDatabase | None = None, schedule_only: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> Lowered:
    """The ONNX file at ``onnx_path`` (from :func:`edgeq.lower.export.export_onnx`, or a float export with
    ``precision="float"``) lowered and compiled for ``target`` (see the module doc).

    ``progress(stage)`` is told ``"lowering"`` and then ``"compiling"`` (or ``"scheduling"``). Raises
    :class:`~edgeq.errors.TargetError` when TVM refuses the model for the target, and
    :class:`~edgeq.errors.EdgeqError` for a missing database or one given for a GPU target.
    """
    from edgeq.compile.library import tvm_refusals
    from edgeq.lower.kernels.micro import kernel_family
    from edgeq.lower.pipeline import lower_relax
    from edgeq.lower.relax_import import import_onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    spec = load_target(target)
    tvm_target = spec.tvm_target()  # the one Target every step below is given
    database = None if tuning_db is None else TuningDatabase.open(tuning_db, [tvm_target])
    if progress is not None:
        progress("lowering")
    mod = import_onnx(Path(onnx_path), batch=1)
    if precision == "int":
        from edgeq.lower.integer import lower_integer

        with tvm_refusals(spec, "to lower the integer model"):
            mod = lower_integer(mod, tvm_target)
    if progress is not None:
        progress("scheduling" if schedule_only else "compiling")
    with tvm_refusals(spec, "to compile the model"):
        module, tuning = lower_relax(mod, tvm_target, tuning_db=database, schedule_only=schedule_only)
    return Lowered(spec, precision, mod, module, tuning, kernel_family(spec, tvm_target)["kernel_family"])
