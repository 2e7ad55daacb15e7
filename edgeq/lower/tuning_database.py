"""The MetaSchedule database ``edgeq tune`` writes and ``edgeq build --tuning-db`` applies: a directory holding
``database_workload.json`` and ``database_tuning_record.json``.

:meth:`TuningDatabase.open` is the one check of a database (the directory holds both files, every target it is
for is a CPU); what compiles with it (:func:`edgeq.lower.lowering.lower_model`) takes the opened database and
returns a :class:`TuningApplied` saying which PrimFuncs took a tuned schedule. It lives with the compile pipeline
that reads it, so that :mod:`edgeq.lower.pipeline` needs nothing from :mod:`edgeq.tune` (which itself compiles
through the pipeline).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgeq.errors import EdgeqError

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def database_exists(path: str | os.PathLike) -> bool:
    return all((Path(path) / name).is_file() for name in DATABASE_FILES)


def database_digest(path: str | os.PathLike) -> str:
    """sha256 over the database's two files: what an artifact's manifest records of the database it used."""
    digest = hashlib.sha256()
    for name in DATABASE_FILES:
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TuningDatabase:
    """A checked database directory (make one with :meth:`open`)."""

    path: Path

    @classmethod
    def open(cls, path: "str | os.PathLike | TuningDatabase", targets: Iterable[Any] = (),
             option: str = "tuning database") -> "TuningDatabase":
        """``path`` checked to hold a database usable for every one of ``targets`` (``tvm.target.Target`` or
        :class:`~edgeq.targets.TargetSpec`); raises :class:`EdgeqError` naming ``option`` otherwise. An
        already opened database is only checked against ``targets``."""
        database = path if isinstance(path, TuningDatabase) else None
        if database is None:
            if not database_exists(path):
                raise EdgeqError(f"{option} {path} holds no MetaSchedule database ({', '.join(DATABASE_FILES)}); "
                                 "write one with `edgeq tune`")
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
