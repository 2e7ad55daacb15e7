"""The MetaSchedule database ``edgeq tune`` writes and ``edgeq build --tuning-db`` applies: a directory holding
``database_workload.json`` and ``database_tuning_record.json``.

It lives with the compile pipeline that reads it, so that :mod:`edgeq.lower.pipeline` needs nothing from
:mod:`edgeq.tune` (which itself compiles through the pipeline).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def apply_database_pass(tuning_db: str | os.PathLike, target):
    """The Relax pass that gives every PrimFunc found in the database its tuned schedule."""
    from tvm import relax

    if not database_exists(tuning_db):
        raise EdgeqError(f"{tuning_db} holds no MetaSchedule database ({', '.join(DATABASE_FILES)}); "
                         "write one with `edgeq tune`")
    return relax.transform.MetaScheduleApplyDatabase(work_dir=str(tuning_db), enable_warning=False)
