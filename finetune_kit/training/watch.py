"""Follow a job to its end: poll with backoff, store and report each new event, metric and status once."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_kit.errors import FtkitError, JobFailedError
from finetune_kit.store import Store, utc_now
from finetune_kit.training.backend import FineTuneBackend, FineTuneJob, JobEvent, StepMetrics
from finetune_kit.training.jobs import (
    TRAINER_DIED,
    JobRecord,
    check_backend,
    job_metrics,
    save_poll,
    unsettled_jobs,
)
from finetune_kit.training.loss_curve import write_loss_curve
from finetune_kit.training.registry import RegisteredModel, register_model

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 1.5
ESTIMATE_MOVE_S = 60  # a new estimated finish is reported once it moves by a minute


@dataclass(frozen=True)
class StatusChanged:
    """The job moved from `previous` to `job.status`."""

    job: FineTuneJob
    previous: str


@dataclass(frozen=True)
class EventReceived:
    """A log line of the job, reported once, oldest first."""

    event: JobEvent


@dataclass(frozen=True)
class MetricsReceived:
    """The training metrics of one step."""

    metrics: StepMetrics


@dataclass(frozen=True)
class FinishEstimated:
    """The service's estimate of when the job ends (unix seconds)."""

    at: int


WatchUpdate = StatusChanged | EventReceived | MetricsReceived | FinishEstimated


@dataclass(frozen=True)
class Polling:
    """How often to ask: `interval_s`, growing while nothing changes, up to `max_interval_s`."""

    interval_s: float = 10.0
    max_interval_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class WatchResult:
    """How a watched job ended, and what was recorded for it."""

    job: FineTuneJob
    model: RegisteredModel | None = None
    loss_curve: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def watch_job(
    store: Store,
    backend: FineTuneBackend,
    record: JobRecord,
    on_update: Callable[[WatchUpdate], None],
    polling: Polling,
    curve_dir: Path,
) -> WatchResult:
    """Poll until the job succeeds, fails or is cancelled; KeyboardInterrupt leaves the job running."""
    check_backend(record, backend)
    assert record.id is not None
    status, estimate, cursor = record.status, record.estimated_finish, record.last_event_id
    interval = polling.interval_s
    while True:
        job, events, new = poll_once(store, backend, record.id, cursor)
        for event in new:
            on_update(EventReceived(event))
            if (metrics := event.step_metrics) is not None:
                on_update(MetricsReceived(metrics))
        changed = bool(new) or job.status != status
        if job.status != status:
            on_update(StatusChanged(job, status))
            status = job.status
        moved = estimate is None or abs((job.estimated_finish or 0) - estimate) >= ESTIMATE_MOVE_S
        if job.estimated_finish is not None and moved and not job.finished:
            on_update(FinishEstimated(job.estimated_finish))
            estimate = job.estimated_finish
        cursor = events[-1].id if events else cursor
        if job.finished:
            return finish_job(store, backend, record, job, curve_dir)
        interval = polling.interval_s if changed else min(interval * BACKOFF_FACTOR, polling.max_interval_s)
        polling.sleep(interval)


def poll_once(
    store: Store, backend: FineTuneBackend, job_id: str, cursor: str | None
) -> tuple[FineTuneJob, list[JobEvent], list[JobEvent]]:
    """Ask the service once and store what it says: (job, events read, events not seen before)."""
    job = backend.retrieve_job(job_id)
    events = backend.list_events(job_id, cursor)
    if job.finished:  # the last events may be written after the final status: read them once more
        events += backend.list_events(job_id, events[-1].id if events else cursor)
    return job, events, save_poll(store, job_id, job, events)


def sync_jobs(store: Store, backend: FineTuneBackend, curve_dir: Path) -> list[WatchResult]:
    """Bring up to date the jobs of this backend that nobody watched to their end, registering their models."""
    results = []
    for record in unsettled_jobs(store, backend.identity):
        assert record.id is not None
        try:
            job, _, _ = poll_once(store, backend, record.id, record.last_event_id)
            if job.finished:
                results.append(finish_job(store, backend, record, job, curve_dir))
        except FtkitError as exc:  # one job the service no longer knows must not keep the others unsettled
            log.warning("job %s not settled: %s", record.id, exc)
    return results


def finish_job(
    store: Store, backend: FineTuneBackend, record: JobRecord, job: FineTuneJob, curve_dir: Path
) -> WatchResult:
    """Draw the loss curve and, for a succeeded job, register its model with a summary of its metrics."""
    assert record.id is not None
    rows = job_metrics(store, record.id)
    curve = None
    if rows:
        curve = write_loss_curve(
            curve_dir / f"{record.id}-loss.png",
            [row["step"] for row in rows],
            [row["train_loss"] for row in rows],
            [row["valid_loss"] for row in rows],
            title=f"{job.fine_tuned_model or record.id} ({job.status})",
        )
    summary = _metrics_summary(rows, job)
    if job.status != "succeeded" or not job.fine_tuned_model:
        return WatchResult(job, loss_curve=curve, metrics=summary)
    summary["checkpoints"] = [checkpoint.model for checkpoint in backend.list_checkpoints(record.id)]
    model = RegisteredModel(
        name=job.fine_tuned_model,
        backend=backend.name,
        base_model=record.base_model,
        job_id=record.id,
        dataset_hash=record.dataset_hash,
        created_at=_finished_at(store, record.id),
        metrics=summary,
    )
    register_model(store, model)
    return WatchResult(job, model=model, loss_curve=curve, metrics=summary)


def _finished_at(store: Store, job_id: str) -> str:
    """When the job ended, by its last event: a job settled days later must not pass for the newest model."""
    last = store.scalar("SELECT MAX(created_at) FROM job_events WHERE job_id = ?", (job_id,))
    if not isinstance(last, int):
        return utc_now()
    return datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds")


def _metrics_summary(rows: list[Any], job: FineTuneJob) -> dict[str, Any]:
    """The last value of each loss, the steps trained and the tokens billed."""
    summary: dict[str, Any] = {"steps": rows[-1]["step"] if rows else 0, "trained_tokens": job.trained_tokens}
    for column in ("train_loss", "valid_loss", "full_valid_loss"):
        values = [row[column] for row in rows if row[column] is not None]
        if values:
            summary[column] = values[-1]
    return summary


def raise_if_unsuccessful(job: FineTuneJob) -> None:
    """A failed or cancelled job as one error line, with the service's reason."""
    if job.status == "failed" and (job.error or "").startswith(TRAINER_DIED):
        raise JobFailedError(
            f"fine-tuning job {job.id} failed: {job.error} — run `ftkit train` again to restart it"
        )
    if job.status == "failed":
        raise JobFailedError(
            f"fine-tuning job {job.id} failed: {job.error or 'no reason given'} — fix the cause, then change"
            " a parameter (e.g. --seed) or the dataset to start a new job"
        )
    if job.status == "cancelled":
        raise JobFailedError(
            f"fine-tuning job {job.id} was cancelled — change a parameter to start a new job"
        )
