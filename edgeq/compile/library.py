"""Build a Relax module for a board and export it as a shared library the board can load.

``export_for_target(mod, "rasp4", "model.so")`` compiles with the board's TVM target and links the result with
the board's cross compiler (``aarch64-linux-gnu-gcc`` for rasp4, ``arm-linux-gnueabihf-gcc`` for rasp4-32), then
checks that the library really is an ELF for the board's architecture. GPU boards get one library holding the
host code (compiled for the board's CPU) and the device code (CUDA C or OpenCL source, compiled on the board when
the module loads).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from edgeq.errors import EdgeqError, TargetError, ToolchainMissingError
from edgeq.fileio import replace_unless_interrupted
from edgeq.interrupt import raise_if_interrupted
from edgeq.compile.targets import TargetSpec, elf_info, load_target

#: the most of TVM's message a refusal quotes (its check can print whole buffers and functions)
_TVM_DETAIL_CHARS = 300


def _raised_by_tvm(err: BaseException) -> bool:
    """An error that came out of TVM's C++ side (``tvm_ffi`` tags every one it converts), or one of TVM's own
    classes; edgeq's own errors and Python bugs stay what they are."""
    import tvm

    return hasattr(err, "__tvm_ffi_error__") or isinstance(
        err, (tvm.error.InternalError, tvm.error.DiagnosticError, tvm.error.OpError))


def _tvm_detail(err: BaseException) -> str:
    """The line of TVM's message that says what failed (the last one; earlier ones are its C++ backtrace)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    detail = lines[-1] if lines else type(err).__name__
    return detail if len(detail) <= _TVM_DETAIL_CHARS else detail[:_TVM_DETAIL_CHARS - 1] + "…"


@contextmanager
def tvm_refusals(spec: TargetSpec, doing: str):
    """Turn an error TVM raises while ``doing`` something for ``spec`` into a one-line :class:`TargetError`."""
    try:
        yield
    except Exception as err:
        if isinstance(err, EdgeqError) or not _raised_by_tvm(err):
            raise
        raise TargetError(f"TVM refused {doing} for {spec.name} ({spec.kind}): {type(err).__name__}: "
                          f"{_tvm_detail(err)}") from err


def build(mod, target: str | TargetSpec, *, tuning_db: str | os.PathLike | None = None):
    """Compile a Relax ``IRModule`` for ``target`` into a ``tvm.relax.Executable`` (nothing linked yet).

    Runs edgeq's pipeline (:func:`edgeq.lower.pipeline.compile_relax`: fp32 GEMM kernels, scheduled float ops,
    integer kernels kept), with ``tuning_db`` from ``edgeq tune``; :func:`edgeq.lower.lower_model` does the same
    from an ONNX file and says what it applied. Raises :class:`TargetError` when TVM fails to compile the module
    for the target.
    """
    from edgeq.lower.pipeline import compile_relax

    spec = load_target(target)
    with tvm_refusals(spec, "to compile the model"):
        return compile_relax(mod, spec.tvm_target(), tuning_db=tuning_db)


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
