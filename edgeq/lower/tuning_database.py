"""The MetaSchedule database ``edgeq tune`` writes and ``edgeq build --tuning-db`` applies: a directory holding
``database_workload.json`` and ``database_tuning_record.json``.

:meth:`TuningDatabase.open` is the one check of a database (the directory holds both files, every target it is
for is a CPU); what compiles with it (:func:`edgeq.lower.lowering.lower_model`) takes the opened database and
returns a :class:`TuningApplied` saying which PrimFuncs took a tuned schedule. It lives with the compile pipeline
that reads it, so that :mod:`edgeq.lower.pipeline` needs nothing from :mod:`edgeq.compile.tune` (which itself compiles
through the pipeline).

A tuning run writes the database as a build writes an artifact (:func:`writing_database`): it holds
``PARENT/.NAME.lock`` from start to end, so a second tune into the same directory fails at once (exit 4); it
tunes into ``PARENT/.NAME.<pid>.partial`` (starting from a copy of the records already there: MetaSchedule adds
to a database) and renames that into place only when the tuning succeeded, so a failed, killed or interrupted
tune leaves an earlier database byte-identical.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgeq.errors import EdgeqError, OutputPathError

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")
#: MetaSchedule's log of every candidate, kept beside the database files
LOG_FILE = "tuning.log"


def database_exists(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in DATABASE_FILES)


def database_digest(path: str | os.PathLike) -> str:
    """sha256 over the database's two files: what an artifact's manifest records of the database it used."""
    digest = hashlib.sha256()
    for name in DATABASE_FILES:
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def check_database(path: str | os.PathLike, option: str = "--tuning-db") -> None:
    """Refuse, in one line and before any long work, a database MetaSchedule could not load or would hang on:
    missing files, files that are not regular (a device would be read forever), too large or not UTF-8, lines
    that are not JSON lists (deep nesting included), and anything MetaSchedule's own loader then refuses."""
    import json

    from edgeq.fileio import parse_nested, read_text
    from edgeq.interrupt import raise_if_interrupted

    path = Path(path)
    if not database_exists(path):
        raise EdgeqError(f"{option} {path} holds no MetaSchedule database ({', '.join(DATABASE_FILES)}); "
                         "write one with `edgeq tune`")
    for name in DATABASE_FILES:
        file = path / name
        for number, line in enumerate(read_text(file, EdgeqError, "tuning database file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = parse_nested(json.loads, line, file, EdgeqError, "tuning database file")
            except json.JSONDecodeError as exc:
                raise EdgeqError(f"{file} line {number} is not JSON ({exc.msg}): not a MetaSchedule database "
                                 "written by `edgeq tune`") from None
            if not isinstance(entry, list) or len(entry) != 2:
                raise EdgeqError(f"{file} line {number} is not a MetaSchedule entry (a JSON list of two)")
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.database.JSONDatabase(work_dir=str(path), allow_missing=False)
    except Exception as exc:  # noqa: BLE001 - TVM's loader raises several kinds; all mean a damaged database
        raise_if_interrupted()
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise EdgeqError(f"{option} {path}: MetaSchedule cannot load this database ({last})") from None


@dataclass(frozen=True)
class TuningDatabase:
    """A checked database directory (make one with :meth:`open`)."""

    path: Path

    @classmethod
    def open(cls, path: "str | os.PathLike | TuningDatabase", targets: Iterable[Any] = (),
             option: str = "tuning database") -> "TuningDatabase":
        """``path`` checked (:func:`check_database`) to hold a database usable for every one of ``targets`` (``tvm.target.Target`` or
        :class:`~edgeq.compile.targets.TargetSpec`); raises :class:`EdgeqError` naming ``option`` otherwise. An
        already opened database is only checked against ``targets``."""
        database = path if isinstance(path, TuningDatabase) else None
        if database is None:
            check_database(path, option)
            database = cls(Path(path))
        for target in targets:
            database.check_target(target, option)
        return database

    @staticmethod
    def check_target(target, option: str = "tuning database") -> None:
        """A database holds CPU schedules: refuse any other target kind."""
        kind = getattr(target, "kind", None)
        kind = kind if isinstance(kind, str) else getattr(kind, "name", str(kind))
        if kind != "llvm":
            name = getattr(target, "name", None) or str(target)
            raise EdgeqError(f"{option} applies to CPU (llvm) targets only; {name} is {kind}")

    def digest(self) -> str:
        return database_digest(self.path)


@dataclass(frozen=True)
class TuningApplied:
    """What a compile took from a database: the manifest's ``tuning`` entry (:meth:`entry`)."""

    database: TuningDatabase
    applied: tuple[str, ...]  # the PrimFuncs that took a tuned schedule, sorted, each once

    def entry(self) -> dict[str, Any]:
        return {"database": str(self.database.path), "sha256": self.database.digest(), "applied": list(self.applied)}


@contextlib.contextmanager
def writing_database(database: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """The directory to tune into for the database ``database`` (see module doc): yields the partial copy; when
    the block ends without an error, the copy replaces ``database``; otherwise it is removed and ``database``
    stays as it was. Raises :class:`OutputBusyError` (4) at once while another process writes ``database`` and
    :class:`OutputPathError` (3) for an existing directory that holds more than a database."""
    from edgeq.fileio import exclusive_output, remove_stale_partials, replace_directory
    from edgeq.interrupt import deferred

    database = Path(database)
    check_database_dir(database, option)
    with exclusive_output(database, option):
        remove_stale_partials(database)  # left by killed tunes: the lock says none of them is still running
        partial = database.parent / f".{database.name}.{os.getpid()}.partial"
        try:
            if database.is_dir():
                shutil.copytree(database, partial, symlinks=True)
            else:
                partial.mkdir()
            yield partial
            replace_directory(partial, database)
        except BaseException:
            with deferred():
                shutil.rmtree(partial, ignore_errors=True)
            raise


def check_database_dir(database: Path, option: str = "--out") -> None:
    """A tuning database directory is new, empty, or holds only a database: anything else there would be copied
    and then replaced, so it is refused."""
    if database.is_symlink() or (database.exists() and not database.is_dir()):
        raise OutputPathError(f"{option} {database} exists and is not a directory")
    if database.is_dir():
        others = sorted(p.name for p in database.iterdir() if p.name not in (*DATABASE_FILES, LOG_FILE)
                        or not p.is_file() or p.is_symlink())
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise OutputPathError(f"{option} {database} holds other files than a tuning database ({shown}); "
                                  "choose another directory (a database there is replaced, anything else is kept)")
