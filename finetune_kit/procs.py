"""Process helpers shared by the embedded llama.cpp server and the local trainer: alive, started when, reaped."""

import contextlib
import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if process `pid` runs; a zombie (exited, not yet reaped by its new parent) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (macOS): kill(0) is all we know
    return fields[0] not in ("Z", "X")


def process_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), to tell it from a later process with the same pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def reap(pid: int) -> None:
    """Collect the exit status of our own child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
