"""Build a Relax module for a board and export it as a shared library the board can load.

``export_for_target(mod, "rasp4", "model.so")`` compiles with the board's TVM target and links the result with
the board's cross compiler (``aarch64-linux-gnu-gcc`` for rasp4, ``arm-linux-gnueabihf-gcc`` for rasp4-32), then
checks that the library really is an ELF for the board's architecture. GPU boards get one library holding the
host code (compiled for the board's CPU) and the device code (CUDA C or OpenCL source, compiled on the board when
the module loads).
"""
from __future__ import annotations

import os
from pathlib import Path
from edgeq.errors import TargetError, ToolchainMissingError
from edgeq.fileio import replace_unless_interrupted
from edgeq.interrupt import raise_if_interrupted
from edgeq.targets import TargetSpec, elf_info, load_target


def build(mod, target: str | TargetSpec, *, relax_pipeline: str = "default", params: dict | None = None,
          tuning_db: str | os.PathLike | None = None, tuned: list[str] | None = None):
    """Compile a Relax ``IRModule`` for ``target`` into a ``tvm.relax.Executable`` (nothing linked yet).

    ``relax_pipeline="default"`` is edgeq's pipeline (:func:`edgeq.lower.pipeline.compile_relax`: fp32 GEMM
    kernels, scheduled float ops, integer kernels kept; ``tuning_db`` from ``edgeq tune``, the PrimFuncs it
    schedules appended to ``tuned``); any other value is handed to ``tvm.compile`` as it is.
    """
    import tvm

    spec = load_target(target)
    if params:
        from tvm import relax

        mod = relax.transform.BindParams("main", params)(mod)
    if relax_pipeline == "default":
        from edgeq.lower.pipeline import compile_relax

        return compile_relax(mod, spec.tvm_target(), tuning_db=tuning_db, tuned=tuned)
    return tvm.compile(mod, target=spec.tvm_target(), relax_pipeline=relax_pipeline)


def export_library(built, target: str | TargetSpec, path: str | os.PathLike) -> Path:
    """Link ``built`` (a ``tvm.relax.Executable`` or runtime module) for ``target``'s board into ``path`` (.so).

    Raises :class:`ToolchainMissingError` naming the Debian package when the cross compiler is missing or
    cannot link, and :class:`TargetError` when the library came out for another architecture than the board's.
    """
    spec = load_target(target)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fcompile = spec.fcompile()  # raises ToolchainMissingError first when the compiler is absent
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix or '.so'}")
    try:
        built.export_library(str(partial), fcompile=fcompile)
    except RuntimeError as err:  # TVM reports a failed link (and a Ctrl-C in its linker callback) as this
        partial.unlink(missing_ok=True)
        raise_if_interrupted()
        message = str(err)
        if "Compilation error" in message or "Command line" in message:
            compiler = spec.toolchain.compiler or "the default C++ compiler"
            lines = [ln.strip() for ln in message.splitlines() if "error" in ln.lower() or "cannot find" in ln]
            detail = " | ".join(lines)[:600] or message.strip()[-600:]
            package = spec.toolchain.package or "unknown"
            raise ToolchainMissingError(
                f"linking the library for {spec.name} with {compiler} failed: {detail}; the Debian package "
                f"{package} must be installed with its recommended C library (deploy/install-host-tools.sh)"
            ) from None
        raise
    got = elf_info(partial)
    if got.arch != spec.arch:
        partial.unlink(missing_ok=True)
        raise TargetError(
            f"the library linked for {spec.name} is {got.describe()}, but the board loads {spec.arch}: "
            f"check the toolchain compiler ({spec.toolchain.compiler}) in {spec.source}"
        )
    replace_unless_interrupted(partial, path)
    return path


def export_for_target(mod, target: str | TargetSpec, path: str | os.PathLike, **build_kwargs) -> Path:
    """:func:`build` then :func:`export_library`; ``mod`` may also be an already built executable."""
    spec = load_target(target)
    spec.toolchain.resolve()  # fail before a long build when the cross compiler is missing
    built = mod if hasattr(mod, "export_library") else build(mod, spec, **build_kwargs)
    return export_library(built, spec, path)
