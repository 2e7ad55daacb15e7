"""Writing result files so that a failure never leaves a half-written file where a good one was; output paths
checked before the work; one writer per output; file digests."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from edgeq.errors import OutputBusyError, OutputPathError
from edgeq.interrupt import deferred, raise_if_interrupted


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # one per process: concurrent writers
    try:
        partial.write_text(text)
        replace_unless_interrupted(partial, path)
    except BaseException:
        with deferred():
            partial.unlink(missing_ok=True)
        raise
    return path


def replace_unless_interrupted(partial: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished ``partial`` onto ``path``, unless a Ctrl-C or SIGTERM arrived (then an earlier ``path``
    stays as it was, even if TVM swallowed the interrupt on the way)."""
    raise_if_interrupted()
    os.replace(partial, path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


#: Largest text input (plan, target, recipe, manifest, latency table) edgeq reads; real ones are a few KB to a
#: few MB. ``EDGEQ_MAX_TEXT_BYTES`` raises it.
DEFAULT_MAX_TEXT_BYTES = 64 << 20


def max_text_bytes() -> int:
    value = os.environ.get("EDGEQ_MAX_TEXT_BYTES", "")
    return int(value) if value.isdigit() else DEFAULT_MAX_TEXT_BYTES


def read_text(path: str | os.PathLike, error: type[Exception], what: str) -> str:
    """The UTF-8 text of a regular file (a link to one is fine); anything else raises ``error`` in one line:
    a missing file, a folder, a device or pipe (reading one could block forever), a file larger than
    :func:`max_text_bytes`, bytes that are not UTF-8."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise error(f"{what} {path} is {kind}")
    limit = max_text_bytes()
    if info.st_size > limit:
        raise error(f"{what} {path} is {info.st_size:,} bytes, more than the {limit:,} edgeq reads "
                    "(EDGEQ_MAX_TEXT_BYTES raises the limit)")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None


def parse_nested(parse, text: str, path: Path, error: type[Exception], what: str) -> Any:
    """``parse(text)`` with runaway nesting (which overflows Python's parsers) reported as ``error``."""
    try:
        return parse(text)
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be a real {what}") from None


def read_json(path: str | os.PathLike, error: type[Exception], what: str) -> Any:
    """Parsed JSON of ``path`` (see :func:`read_text`); bad JSON raises ``error`` naming ``what`` and the place."""
    path = Path(path)
    text = read_text(path, error, what)
    try:
        return parse_nested(json.loads, text, path, error, what)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str) -> Any:
    """Parsed YAML of ``path`` (safe loader; see :func:`read_text`); a YAML error is one line naming the place."""
    import yaml

    path = Path(path)
    text = read_text(path, error, what)
    try:
        return parse_nested(yaml.safe_load, text, path, error, what)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{what} {path} is not valid YAML{where}: {' '.join(str(problem).split())}") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (archives and artifacts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path: str | os.PathLike, option: str, *, directory: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written at the end: a file path that is a directory
    (or a directory path that is a file), or one whose nearest existing parent is not a writable directory.
    Missing parent folders are fine: the writers create them."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if directory and not path.is_dir():
            raise OutputPathError(f"{option} {path} exists and is not a directory")
        if not directory and path.is_dir():
            raise OutputPathError(f"{option} {path} is a directory; give a file name")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write in {parent}")
    return path


@contextlib.contextmanager
def exclusive_output(path: str | os.PathLike, option: str) -> Iterator[Path]:
    """Hold ``PARENT/.NAME.lock`` while this process writes ``path``: a second edgeq process writing the same
    output fails at once with :class:`OutputBusyError` instead of racing for it. The lock is released by the
    kernel when the process dies, so a killed run never blocks the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputBusyError(f"{option} {path} is being written by edgeq pid {holder}; wait for it to finish "
                                  "or choose another output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        handle.close()


def remove_stale_partials(path: Path) -> None:
    """Remove partial outputs of ``path`` left by killed runs; call only while holding :func:`exclusive_output`."""
    import re
    import shutil

    # exactly ".NAME.<pid>.partial" (and ".NAME.<pid>.old.partial"): not the partials of an output "NAME.v2"
    own = re.compile(rf"\.{re.escape(path.name)}\.\d+\.(old\.)?partial")
    for stale in path.parent.iterdir():
        if not own.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def replace_directory(partial: Path, out_dir: Path) -> Path:
    """Move the finished directory ``partial`` onto ``out_dir``, replacing an earlier one only now (call while
    holding :func:`exclusive_output`); a recorded interrupt stops it before anything moves."""
    import shutil

    raise_if_interrupted()
    old = out_dir.parent / f".{out_dir.name}.{os.getpid()}.old.partial"
    with deferred():  # the two renames go together: never an interrupt between them
        if out_dir.exists():
            out_dir.rename(old)
        partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
