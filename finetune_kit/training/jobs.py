"""Start, find and cancel fine-tuning jobs, with every external id in the state DB before anything waits on it."""

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from finetune_kit.errors import TrainingError
from finetune_kit.extras import require_train
from finetune_kit.store import Store, utc_now
from finetune_kit.training.backend import (
    TERMINAL_STATUSES,
    DatasetFile,
    FineTuneBackend,
    FineTuneJob,
    JobEvent,
    TrainingParams,
)

log = logging.getLogger(__name__)

METADATA_JOB_KEY = "ftkit_job_key"
METADATA_DATASET = "ftkit_dataset"
CREATING = "creating"  # the row exists, the service may or may not have the job yet
TRAINER_DIED = "the trainer process stopped without finishing"  # local backend: not the job's own failure


@dataclass(frozen=True)
class JobRecord:
    """A job as the state DB knows it."""

    key: str
    id: str | None
    backend: str
    status: str
    base_model: str
    dataset_hash: str
    params: TrainingParams
    train_file_id: str
    validation_file_id: str | None
    fine_tuned_model: str | None
    error: str | None
    estimated_finish: int | None
    last_event_id: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        """The record of one `jobs` row."""
        values = {name: value for name, value in dict(row).items() if name in cls.__dataclass_fields__}
        return cls(**values, params=TrainingParams.from_json(row["params_json"]))


@dataclass(frozen=True)
class StartedJob:
    """What `start_job` did: the job, how many files it uploaded, and whether it created the job."""

    record: JobRecord
    uploaded: int
    created: bool


def dataset_files(dataset_dir: Path) -> tuple[DatasetFile, DatasetFile | None]:
    """The dataset's train file and (when present and not empty) its validation file."""
    train = dataset_dir / "train.jsonl"
    if not train.is_file():
        raise TrainingError(
            f"{train}: no training file — run `ftkit build-dataset` first, or pass --dataset DIR"
        )
    validation = dataset_dir / "validation.jsonl"
    has_validation = validation.is_file() and validation.stat().st_size > 0
    return _dataset_file(train), _dataset_file(validation) if has_validation else None


def check_example_count(train: DatasetFile, minimum: int) -> None:
    """Refuse, before anything is uploaded, a training file with fewer examples than the service accepts."""
    with train.path.open("rb") as lines:
        count = sum(1 for line in lines if line.strip())
    if count < minimum:
        raise TrainingError(
            f"{train.path}: only {count} training example{'s' if count != 1 else ''}, fewer than min_examples"
            f" ({minimum}; OpenAI accepts no fewer than 10) — build a bigger dataset (more documents or"
            " --questions-per-chunk), or lower --min-examples"
        )


def _dataset_file(path: Path) -> DatasetFile:
    return DatasetFile(path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def dataset_hash(train: DatasetFile, validation: DatasetFile | None) -> str:
    """The dataset's content id: both files' hashes, versioned."""
    both = train.sha256 + ":" + (validation.sha256 if validation else "")
    return "ds1:" + hashlib.sha256(both.encode()).hexdigest()[:16]


def job_key(backend_identity: str, dataset: str, params: TrainingParams) -> str:
    """One job per backend, dataset and parameters: re-running `ftkit train` re-attaches to it."""
    parts = json.dumps([backend_identity, dataset, params.to_json()])
    return "ftj1:" + hashlib.sha256(parts.encode()).hexdigest()[:16]


def start_job(
    store: Store, backend: FineTuneBackend, dataset_dir: Path, params: TrainingParams, min_examples: int = 1
) -> StartedJob:
    """Upload what is not uploaded yet and create the job — or return the job these inputs already made."""
    train, validation = dataset_files(dataset_dir)
    check_example_count(train, min_examples)
    dataset = dataset_hash(train, validation)
    key = job_key(backend.identity, dataset, params)
    existing = _job_by_key(store, key)
    if existing is not None and backend.name == "local":
        existing = _refreshed(store, backend, existing)  # its trainer may have died since (a DB read)
    if existing is not None and _trainer_died(existing):
        _set_aside(store, existing)  # a crash of the machine, not of the training: run the job again
        existing = None
    if existing is not None and existing.id is not None:
        return StartedJob(existing, uploaded=0, created=False)
    if backend.name == "local":  # checked before any upload or row, so a missing extra leaves no trace
        require_train("local training")
    train_id, uploaded = ensure_file(store, backend, train)
    validation_id = None
    if validation is not None:
        validation_id, uploaded_validation = ensure_file(store, backend, validation)
        uploaded += uploaded_validation
    if existing is None:
        _insert_job(store, key, backend.identity, dataset, params, train_id, validation_id)
    # A crash between the create call and the UPDATE below leaves a job only the service knows: find it.
    job = backend.find_job(METADATA_JOB_KEY, key) if existing is not None else None
    created = job is None
    if job is None:
        metadata = {METADATA_JOB_KEY: key, METADATA_DATASET: dataset}
        job = backend.create_job(params, train_id, validation_id, metadata)
    store.db.execute(
        "UPDATE jobs SET id = ?, status = ?, updated_at = ? WHERE key = ?",
        (job.id, job.status, utc_now(), key),
    )
    log.info("job %s for %s (%s)", job.id, key, "created" if created else "found on the service")
    return StartedJob(_job_by_key_required(store, key), uploaded=uploaded, created=created)


def _refreshed(store: Store, backend: FineTuneBackend, record: JobRecord) -> JobRecord:
    """The record after one look at the service, when the DB still has the job unfinished."""
    if record.id is None or record.status in TERMINAL_STATUSES:
        return record
    save_poll(store, record.id, backend.retrieve_job(record.id), [])
    return _job_by_key_required(store, record.key)


def _trainer_died(record: JobRecord) -> bool:
    """A local job whose trainer process vanished (kill -9, OOM, reboot) failed for no reason of its own."""
    return record.status == "failed" and (record.error or "").startswith(TRAINER_DIED)


def _set_aside(store: Store, record: JobRecord) -> None:
    """Keep the dead job's row and events under another key, freeing this one for a new job."""
    store.db.execute("UPDATE jobs SET key = ? WHERE key = ?", (f"{record.key}:{record.id}", record.key))


def ensure_file(store: Store, backend: FineTuneBackend, file: DatasetFile) -> tuple[str, int]:
    """The file's id on the backend, uploading it only if this content was never uploaded there: (id, uploads)."""
    known = store.scalar(
        "SELECT file_id FROM training_files WHERE backend = ? AND sha256 = ? AND purpose = ?",
        (backend.identity, file.sha256, file.purpose),
    )
    if known is not None and backend.has_file(str(known)):
        return str(known), 0
    file_id = backend.upload(file)  # never uploaded, or gone from the backend since
    store.db.execute(
        "INSERT OR REPLACE INTO training_files(backend, sha256, purpose, file_id, uploaded_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (backend.identity, file.sha256, file.purpose, file_id, utc_now()),
    )
    return file_id, 1


def _insert_job(
    store: Store,
    key: str,
    backend: str,
    dataset: str,
    params: TrainingParams,
    train_id: str,
    validation_id: str | None,
) -> None:
    now = utc_now()
    store.db.execute(
        """INSERT INTO jobs(key, backend, status, base_model, dataset_hash, params_json, train_file_id,
               validation_file_id, created_at, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            key,
            backend,
            CREATING,
            params.base_model,
            dataset,
            params.to_json(),
            train_id,
            validation_id,
            now,
            now,
        ),
    )


def _job_by_key(store: Store, key: str) -> JobRecord | None:
    row = store.db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
    return JobRecord.from_row(row) if row else None


def _job_by_key_required(store: Store, key: str) -> JobRecord:
    record = _job_by_key(store, key)
    assert record is not None
    return record


def find_job(store: Store, job_id: str | None = None) -> JobRecord:
    """The job with this id, or the newest started one."""
    if job_id is not None:
        row = store.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise TrainingError(f"no job {job_id} in {store.path} — `ftkit train` starts one")
    else:
        row = store.db.execute(
            "SELECT * FROM jobs WHERE id IS NOT NULL ORDER BY created_at DESC, rowid DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise TrainingError(f"no fine-tuning job in {store.path} yet — start one with `ftkit train`")
    return JobRecord.from_row(row)


def unsettled_jobs(store: Store, backend_identity: str) -> list[JobRecord]:
    """Started jobs still running as far as the DB knows, or succeeded without a registered model."""
    rows = store.db.execute(
        f"""SELECT * FROM jobs WHERE backend = ? AND id IS NOT NULL AND (
               status NOT IN ({", ".join("?" * len(TERMINAL_STATUSES))})
               OR (status = 'succeeded' AND fine_tuned_model IS NOT NULL
                   AND fine_tuned_model NOT IN (SELECT name FROM finetuned_models)))
           ORDER BY created_at""",
        (backend_identity, *sorted(TERMINAL_STATUSES)),
    ).fetchall()
    return [JobRecord.from_row(row) for row in rows]


def check_backend(record: JobRecord, backend: FineTuneBackend) -> None:
    """Refuse to ask a service about a job another service runs."""
    if record.backend != backend.identity:
        raise TrainingError(
            f"job {record.id} runs on {record.backend}, not {backend.identity} — set OPENAI_BASE_URL (or --backend) as when it was started"
        )


def cancel_job(store: Store, backend: FineTuneBackend, record: JobRecord) -> FineTuneJob:
    """Ask the service to stop the job and record what it says."""
    check_backend(record, backend)
    assert record.id is not None
    job = backend.cancel_job(record.id)
    save_poll(store, record.id, job, [])
    return job


def save_poll(store: Store, job_id: str, job: FineTuneJob, events: list[JobEvent]) -> list[JobEvent]:
    """Store one poll's job state, events and metrics in one transaction; returns the events not seen before."""
    now = utc_now()
    new: list[JobEvent] = []
    with store.transaction() as db:
        for event in events:
            cursor = db.execute(
                "INSERT OR IGNORE INTO job_events(job_id, event_id, created_at, level, message, data_json)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, event.id, event.created_at, event.level, event.message, json.dumps(event.data)),
            )
            if cursor.rowcount == 1:
                new.append(event)
            if (metrics := event.step_metrics) is not None:
                db.execute(  # a step may be reported twice (training, then validation): keep both halves
                    """INSERT INTO job_metrics(job_id, step, total_steps, train_loss, valid_loss,
                           full_valid_loss, train_accuracy, valid_accuracy, recorded_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(job_id, step) DO UPDATE SET
                           total_steps = COALESCE(excluded.total_steps, total_steps),
                           train_loss = COALESCE(excluded.train_loss, train_loss),
                           valid_loss = COALESCE(excluded.valid_loss, valid_loss),
                           full_valid_loss = COALESCE(excluded.full_valid_loss, full_valid_loss),
                           train_accuracy = COALESCE(excluded.train_accuracy, train_accuracy),
                           valid_accuracy = COALESCE(excluded.valid_accuracy, valid_accuracy),
                           recorded_at = excluded.recorded_at""",
                    (
                        job_id,
                        metrics.step,
                        metrics.total_steps,
                        metrics.train_loss,
                        metrics.valid_loss,
                        metrics.full_valid_loss,
                        metrics.train_accuracy,
                        metrics.valid_accuracy,
                        now,
                    ),
                )
        db.execute(
            """UPDATE jobs SET status = ?, fine_tuned_model = ?, error = ?, estimated_finish = ?, updated_at = ?,
                   finished_at = CASE WHEN ? THEN COALESCE(finished_at, ?) END,
                   last_event_id = COALESCE(?, last_event_id)
               WHERE id = ?""",
            (
                job.status,
                job.fine_tuned_model,
                job.error,
                job.estimated_finish,
                now,
                job.finished,
                now,
                events[-1].id if events else None,
                job_id,
            ),
        )
    return new


def job_metrics(store: Store, job_id: str) -> list[sqlite3.Row]:
    """The job's saved per-step metrics, in step order."""
    return store.db.execute("SELECT * FROM job_metrics WHERE job_id = ? ORDER BY step", (job_id,)).fetchall()
