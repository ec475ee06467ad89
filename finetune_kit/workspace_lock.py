"""One writer per workspace: an OS lock on a file in it, which the kernel releases when its holder dies.

Commands that change the workspace (ingest, generate-questions, build-dataset, run) hold it for their whole run; a
second one waits for the first and says whom it waits for. Readers (status, search, ask, the Slack bot, sources,
models) never take it. The file records the holder's pid and start time only for that message: whether the lock
is held is the kernel's word (flock), so a holder killed with -9 leaves nothing to clean up.
"""

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune_kit.procs import process_start_time
from finetune_kit.store import utc_now

log = logging.getLogger(__name__)
LOCK_FILE = "writer.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a workspace's writer lock, as its lock file says."""

    pid: int | None
    command: str
    since: str
    pid_started: str | None = None

    def describe(self) -> str:
        """The holder in the user's words, for the message of the process waiting for it."""
        if self.pid is None:
            return "another ftkit process"
        return f"ftkit process {self.pid} ({self.command}, started {self.since})"


def read_holder(workspace: Path) -> LockHolder:
    """What the lock file says about its holder; a file being rewritten reads as an unknown holder."""
    try:
        data = json.loads((workspace / LOCK_FILE).read_text())
        return LockHolder(int(data["pid"]), str(data["command"]), str(data["since"]), data.get("pid_started"))
    except (OSError, ValueError, KeyError, TypeError):
        return LockHolder(None, "", "")


def _say_waiting(workspace: Path, holder: LockHolder) -> None:
    log.warning("%s: waiting for %s to finish with this workspace", workspace, holder.describe())


@contextlib.contextmanager
def writer_lock(
    workspace: Path, command: str, on_wait: Callable[[Path, LockHolder], None] = _say_waiting
) -> Iterator[LockHolder]:
    """Hold the workspace's writer lock for the block, waiting (after `on_wait`) while another process holds it."""
    workspace.mkdir(parents=True, exist_ok=True)
    fd = os.open(workspace / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(workspace, read_holder(workspace))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield _record_holder(fd, workspace, command)
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _record_holder(fd: int, workspace: Path, command: str) -> LockHolder:
    pid = os.getpid()
    holder = LockHolder(pid, command, utc_now(), process_start_time(pid))
    data = json.dumps(
        {"pid": pid, "command": command, "since": holder.since, "pid_started": holder.pid_started}
    )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data.encode(), 0)
    except OSError as exc:  # the record only names the holder to waiters; the lock itself is held
        log.debug("%s: cannot record the lock's holder (%s)", workspace / LOCK_FILE, exc)
    return holder
