"""Resolve a data argument (folder or ImageFolder archive) to a folder on disk.

Archives are extracted once into a cache keyed by the archive's sha256, so a
renamed or moved copy of the same archive reuses the extraction and a changed
archive never reuses a stale one.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from edgeq.errors import DataError
from edgeq.fileio import file_sha256

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))


# A checkout of edgeq sits beside the shared data sets (`../shared/data`); that is the
# default data root when EDGEQ_DATA is not set.
_CHECKOUT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_root() -> Path | None:
    root = os.environ.get("EDGEQ_DATA")
    if root:
        return Path(root)
    return _CHECKOUT_DATA if _CHECKOUT_DATA.is_dir() else None


def resolve_data_path(spec: str | os.PathLike) -> Path:
    """A path as given, or relative to ``$EDGEQ_DATA`` when it does not exist as given."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    root = data_root()
    if root is not None and not path.is_absolute() and (root / path).exists():
        return root / path
    hint = f" (nor under EDGEQ_DATA={root})" if root is not None else ""
    raise DataError(f"data path {str(spec)!r} does not exist{hint}")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_members(archive: tarfile.TarFile, source: Path):
    for member in archive.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts:
            raise DataError(f"{source}: archive member {member.name!r} escapes the extraction folder")
        if member.isfile() or member.isdir():
            yield member


def extract_archive(path: Path) -> Path:
    """Extract ``path`` into the cache (once) and return the extraction folder."""
    if not path.is_file():  # hashing a device or pipe named *.tar.gz would never end
        raise DataError(f"archive {path} is not a regular file")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise DataError(f"cannot read archive {path}: {exc.strerror or exc}") from None
    target = cache_root() / "datasets" / digest[:20]
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside the target and rename, so an interrupted extraction never
    # looks complete to the next run.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        try:
            with tarfile.open(path) as archive:
                archive.extractall(staging, members=_safe_members(archive, path), filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{path} is not a readable tar archive ({exc})") from None
        (staging / ".complete").write_text(f"{path.name} {digest}\n")
        # Another process may have finished the same extraction meanwhile and be
        # reading it: keep that one. Only an incomplete leftover is replaced.
        if (target / ".complete").exists():
            return target
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise DataError(f"cannot move the extraction of {path} into {target}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def materialize(spec: str | os.PathLike) -> Path:
    """Folder holding the data named by ``spec`` (a folder, or an archive extracted to the cache)."""
    path = resolve_data_path(spec)
    if path.is_dir():
        return path
    if is_archive(path):
        return extract_archive(path)
    raise DataError(f"{path} is neither a folder nor a .tar/.tar.gz archive")
