"""The local LoRA backend: a fine-tuning "service" whose jobs are rows in the state DB and detached trainers.

It speaks the same FineTuneBackend protocol as the hosted API, so `ftkit train --watch`, Ctrl-C detach,
re-attach and cancel behave the same. The trainer (`local_trainer.py`) runs in its own session and writes its
status and events here; a trainer that died without saying so is reported as failed with its last log line.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.disk_space import written_whole
from finetune_kit.errors import TrainingError
from finetune_kit.procs import pid_alive, process_start_time, reap
from finetune_kit.store import Store, utc_now
from finetune_kit.training.backend import (
    TERMINAL_STATUSES,
    Checkpoint,
    DatasetFile,
    FineTuneJob,
    JobEvent,
    TrainingParams,
)
from finetune_kit.training.jobs import TRAINER_DIED

IDENTITY = "local:ftkit"
TRAINER_LOG = "trainer.log"
CANCEL_GRACE_S = 20.0


@dataclass(frozen=True)
class TrainerOptions:
    """How the trainer runs on this machine (not part of what the job is: the same job may run elsewhere)."""

    threads: int | None = None
    launcher: tuple[
        str, ...
    ] = ()  # e.g. ("accelerate", "launch", "--num_processes", "2"); empty: this Python


class LocalBackend:
    """Jobs in `local_jobs`, events in `local_job_events`, artefacts under `<workspace>/training/`."""

    name = "local"
    identity = IDENTITY

    def __init__(self, store: Store, workspace: Path, options: TrainerOptions | None = None) -> None:
        self.store = store
        self.root = workspace / "training"
        self.options = options or TrainerOptions()

    def close(self) -> None:
        """Nothing to release: the store belongs to the caller."""

    def upload(self, file: DatasetFile) -> str:
        """Copy the file into the workspace, so the job trains on this content even if the dataset changes."""
        from finetune_kit.training.examples import read_examples

        read_examples(file.path)  # refuse a malformed file now, naming the user's file and line
        file_id = f"file-local-{file.sha256[:24]}"
        target = self.root / "files" / f"{file_id}.jsonl"
        if not target.is_file():
            _copy_whole(file.path, target)
        return file_id

    def has_file(self, file_id: str) -> bool:
        """Whether the copy is still in the workspace (someone may have cleaned `training/files`)."""
        return (self.root / "files" / f"{file_id}.jsonl").is_file()

    def create_job(
        self,
        params: TrainingParams,
        train_file_id: str,
        validation_file_id: str | None,
        metadata: dict[str, str],
    ) -> FineTuneJob:
        """Record the job, then start its trainer in the background."""
        from finetune_kit.training.base_model import resolve_base_model

        base = resolve_base_model(params.base_model)
        job_id = f"ftjob-local-{secrets.token_hex(6)}"
        output = self.root / job_id
        output.mkdir(parents=True, exist_ok=True)
        now = utc_now()
        self.store.db.execute(
            """INSERT INTO local_jobs(id, status, base_model, base_gguf, params_json, options_json, metadata_json,
                   train_file, validation_file, output_dir, created_at, updated_at)
               VALUES (?, 'validating_files', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                job_id,
                params.base_model,
                str(base.gguf) if base.gguf else None,
                params.to_json(),
                json.dumps({"threads": self.options.threads}),
                json.dumps(metadata, sort_keys=True),
                str(self._file_path(train_file_id)),
                str(self._file_path(validation_file_id)) if validation_file_id else None,
                str(output),
                now,
                now,
            ),
        )
        add_event(self.store, job_id, f"Created fine-tuning job: {job_id}")
        self._spawn(job_id, output)
        return self.retrieve_job(job_id)

    def find_job(self, metadata_key: str, value: str) -> FineTuneJob | None:
        """The job created with this metadata value, if the create call got that far."""
        rows = self.store.db.execute(
            "SELECT id, metadata_json FROM local_jobs WHERE pid IS NOT NULL ORDER BY created_at DESC"
        )  # a job whose trainer never started is not worth re-attaching to: a re-run creates another
        for row in rows:
            if json.loads(row["metadata_json"]).get(metadata_key) == value:
                return self.retrieve_job(row["id"])
        return None

    def retrieve_job(self, job_id: str) -> FineTuneJob:
        """The job as its trainer last wrote it — failed, if the trainer is gone without finishing."""
        row = self._row(job_id)
        if row["status"] not in TERMINAL_STATUSES and not _trainer_alive(row):
            row = self._row(job_id)  # it may have finished between the two reads
            if row["status"] not in TERMINAL_STATUSES:
                reason = f"{TRAINER_DIED} ({last_log_line(Path(row['output_dir']))})"
                with self.store.transaction():  # status and event together, once, though many may look
                    if finish_job(self.store, job_id, "failed", error=reason):
                        add_event(self.store, job_id, f"Training failed: {reason}", level="error")
                row = self._row(job_id)
        return _job(row)

    def list_events(self, job_id: str, after: str | None) -> list[JobEvent]:
        """Events after `after`, oldest first."""
        since = int(after.rsplit("-", 1)[1]) if after else 0
        rows = self.store.db.execute(
            "SELECT * FROM local_job_events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, since)
        ).fetchall()
        return [
            JobEvent(
                id=f"ftevent-local-{row['seq']}",
                created_at=row["created_at"],
                level=row["level"],
                message=row["message"],
                data=json.loads(row["data_json"]),
            )
            for row in rows
        ]

    def cancel_job(self, job_id: str) -> FineTuneJob:
        """Ask the trainer to stop (it finishes the step it is on), killing it if it does not within the grace time."""
        row = self._row(job_id)
        if row["status"] in TERMINAL_STATUSES:
            return _job(row)
        self.store.db.execute("UPDATE local_jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        if _trainer_alive(row):
            _signal(row["pid"], signal.SIGTERM)
            deadline = time.monotonic() + CANCEL_GRACE_S
            while _trainer_alive(row) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _trainer_alive(row):
                _signal(row["pid"], signal.SIGKILL)
        if self._row(job_id)["status"] not in TERMINAL_STATUSES:
            add_event(self.store, job_id, "Fine-tuning job cancelled")
            finish_job(self.store, job_id, "cancelled")
        return _job(self._row(job_id))

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Local jobs keep only their final adapter, which is the fine-tuned model itself."""
        return []

    def _file_path(self, file_id: str) -> Path:
        path = self.root / "files" / f"{file_id}.jsonl"
        if not path.is_file():
            raise TrainingError(
                f"local file {file_id} is missing from {path.parent} — run `ftkit train` again"
            )
        return path

    def _row(self, job_id: str) -> Any:
        row = self.store.db.execute("SELECT * FROM local_jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise TrainingError(f"no local job {job_id} in {self.store.path} — `ftkit train` starts one")
        return row

    def _spawn(self, job_id: str, output: Path) -> None:
        """Start the trainer in its own session (Ctrl-C in the terminal does not reach it) and record its pid."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["TOKENIZERS_PARALLELISM"] = "false"
        for secret in (
            "OPENAI_API_KEY",
            "SLACK_BOT_TOKEN",
            "SLACK_APP_TOKEN",
            "SLACK_SIGNING_SECRET",
            "AIRTABLE_API_KEY",
        ):
            env.pop(secret, None)  # the trainer needs none of them
        launcher = list(self.options.launcher) or [sys.executable]
        command = [*launcher, "-m", "finetune_kit.training.local_trainer", str(self.store.path), job_id]
        with (output / TRAINER_LOG).open("ab") as log:
            try:
                process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                finish_job(self.store, job_id, "failed", error=f"cannot start the trainer: {exc.strerror}")
                raise TrainingError(
                    f"training_launcher {launcher[0]}: cannot start it ({exc.strerror}) — install it or fix the"
                    " training_launcher setting"
                ) from exc
        self.store.db.execute(
            "UPDATE local_jobs SET pid = ?, pid_started = ?, updated_at = ? WHERE id = ?",
            (process.pid, process_start_time(process.pid), utc_now(), job_id),
        )


def add_event(
    store: Store, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None
) -> None:
    """Append one event to the job's log."""
    store.db.execute(
        "INSERT INTO local_job_events(job_id, created_at, level, message, data_json) VALUES (?, ?, ?, ?, ?)",
        (job_id, int(time.time()), level, message, json.dumps(data or {})),
    )


def set_status(store: Store, job_id: str, status: str, **fields: Any) -> bool:
    """Move a running job to `status`, with any of estimated_finish, trained_tokens, fine_tuned_model, error."""
    assignments = "".join(f", {name} = ?" for name in fields)
    cursor = store.db.execute(  # a finished job stays finished (a cancel may land while the trainer reports a step)
        f"UPDATE local_jobs SET status = ?, updated_at = ?{assignments}"
        f" WHERE id = ? AND status NOT IN ({', '.join('?' * len(TERMINAL_STATUSES))})",
        (status, utc_now(), *fields.values(), job_id, *sorted(TERMINAL_STATUSES)),
    )
    return cursor.rowcount == 1


def finish_job(store: Store, job_id: str, status: str, **fields: Any) -> bool:
    """End the job once: a finished job's status never changes again. True if this call ended it."""
    return set_status(store, job_id, status, estimated_finish=None, **fields)


def _copy_whole(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a partial file: a full disk leaves neither behind and says what it needs."""
    with written_whole(target, ".partial", needed=lambda: source.stat().st_size) as partial:
        shutil.copyfile(source, partial)


def last_log_line(output: Path) -> str:
    """The trainer log's last non-empty line: usually the error that stopped it."""
    try:
        lines = [
            line for line in (output / TRAINER_LOG).read_text(errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        return "no trainer log"
    return lines[-1].strip()[:300] if lines else "the trainer printed nothing"


def _trainer_alive(row: Any) -> bool:
    pid = row["pid"]
    if not pid:
        return False
    reap(pid)  # our own child (the CLI that started it) would otherwise linger as a zombie
    if not pid_alive(pid):
        return False
    started = process_start_time(pid)
    return started is None or row["pid_started"] is None or started == row["pid_started"]


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _job(row: Any) -> FineTuneJob:
    return FineTuneJob(
        id=row["id"],
        status=row["status"],
        base_model=row["base_model"],
        fine_tuned_model=row["fine_tuned_model"],
        error=row["error"],
        estimated_finish=row["estimated_finish"],
        trained_tokens=row["trained_tokens"],
        metadata=json.loads(row["metadata_json"]),
    )
