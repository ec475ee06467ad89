"""Files written whole, and full disks as one-line errors that name the path, the space needed and the space free."""

import errno
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune_kit.errors import DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
SQLITE_FULL = 13
SQLITE_IOERR = 10
NEARLY_FULL_BYTES = 1 << 20  # below this, an I/O error opening the database is taken for a full disk


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT and for SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_FULL
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes free to unprivileged writers on the disk holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_full_error(path: Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write to `path` that ran out of space."""
    free = free_bytes(path)
    space = [f"needs {human_size(needed)}"] if needed is not None else []
    space += [f"{human_size(free)} free"] if free is not None else []
    return DiskFullError(
        f"{path}: no space left on its disk ({', '.join(space) or 'free space unknown'})"
        " — free some space (or point the output elsewhere) and re-run; finished work is kept"
    )


@contextmanager
def written_whole(
    path: Path, suffix: str = ".tmp", needed: Callable[[], int] | None = None
) -> Iterator[Path]:
    """A temporary path beside `path` that replaces `path` when the block succeeds and is removed when it fails.

    A full disk becomes a DiskFullError naming `path` and, if `needed` says, the bytes the file needs.
    """
    partial = path.with_name(path.name + suffix)  # one name: the workspace's writer lock admits one writer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        os.replace(partial, path)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, needed() if needed else None) from exc
        raise


def human_size(n: int) -> str:
    """A byte count as people read it: 512 B, 3.4 KB, 12.0 MB."""
    size, unit = float(n), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
