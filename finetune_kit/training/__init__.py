"""Fine-tuning: a backend per service (OpenAI/Azure, local LoRA), a watch loop, a registry; `run_training` ties them."""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from finetune_kit.config import HOSTED_BASE_MODEL, LOCAL_MODEL_ALIAS, Settings
from finetune_kit.store import Store
from finetune_kit.training.backend import FineTuneBackend, FineTuneJob, TrainingParams
from finetune_kit.training.jobs import JobRecord, StartedJob, cancel_job, find_job, start_job
from finetune_kit.training.watch import Polling, WatchResult, WatchUpdate, raise_if_unsuccessful, watch_job

DEFAULT_BASE_MODELS = {"openai": HOSTED_BASE_MODEL, "local": LOCAL_MODEL_ALIAS}


def training_params(settings: Settings) -> TrainingParams:
    """The job's parameters from the settings (`None` leaves a hyperparameter to the service)."""
    backend = settings.resolved_training_backend
    return TrainingParams(
        base_model=settings.base_model or DEFAULT_BASE_MODELS.get(backend, ""),
        n_epochs=settings.epochs,
        batch_size=settings.training.batch_size,
        learning_rate_multiplier=settings.training.learning_rate_multiplier,
        suffix=settings.training.suffix,
        seed=settings.training.seed,
        lora_rank=settings.training.lora_rank if backend == "local" else None,
        lora_alpha=settings.training.lora_alpha if backend == "local" else None,
        max_length=settings.training.max_length if backend == "local" else None,
    )


POLL_INTERVALS_S = {
    "openai": (10.0, 60.0),
    "local": (2.0, 10.0),
}  # (first, longest): a local job is a DB read


def polling(settings: Settings, backend: str | None = None) -> Polling:
    """How often the watch loop asks the service."""
    first, longest = POLL_INTERVALS_S[backend or settings.resolved_training_backend]
    return Polling(
        settings.training.poll_interval_s or first, settings.training.max_poll_interval_s or longest
    )


@contextlib.contextmanager
def open_backend(settings: Settings, name: str | None = None) -> Iterator[FineTuneBackend]:
    """The fine-tuning service `name` (default: the one the settings select), open for the context."""
    if (name or settings.resolved_training_backend) == "local":
        yield from _local_backend(settings)
        return
    from finetune_kit.llm.endpoint import openai_endpoint
    from finetune_kit.training.openai_backend import OpenAIBackend

    endpoint = openai_endpoint(settings)
    backend = OpenAIBackend(
        endpoint.base_url,
        endpoint.api_key,
        timeout_s=settings.request_timeout_s,
        max_retries=settings.max_retries,
    )
    try:
        yield backend
    finally:
        backend.close()


def _local_backend(settings: Settings) -> Iterator[FineTuneBackend]:
    from finetune_kit.store import Store
    from finetune_kit.training.local_backend import LocalBackend, TrainerOptions

    options = TrainerOptions(threads=settings.training.threads, launcher=tuple(settings.training.launcher))
    with Store(settings.db_path) as store:
        yield LocalBackend(store, settings.workspace, options)


@dataclass(frozen=True)
class JobStarted:
    """`run_training` created the job, or found the one these inputs started."""

    started: StartedJob


@dataclass(frozen=True)
class WatchStarted:
    """Following the job begins (Ctrl-C from here on detaches and leaves it running)."""

    record: JobRecord


@dataclass(frozen=True)
class TrainingOutcome:
    """The job, and once followed to its end: how it ended, what the sinks recorded, the price per 1M tokens."""

    record: JobRecord
    started: StartedJob | None = None
    result: WatchResult | None = None
    published: list[str] = field(default_factory=list)
    training_price: float = 0.0


@dataclass(frozen=True)
class TrainingFinished:
    """The followed job ended; reported before a failed job is raised as JobFailedError."""

    outcome: TrainingOutcome


TrainingUpdate = JobStarted | WatchStarted | TrainingFinished | WatchUpdate


def _ignore(update: TrainingUpdate) -> None:
    """Report nothing."""


def run_training(
    settings: Settings, watch: bool = False, on_update: Callable[[TrainingUpdate], None] = _ignore
) -> TrainingOutcome:
    """Upload settings.dataset_path and start its job (or re-attach); with `watch`, follow it as `watch_training`."""
    with open_backend(settings) as backend, Store(settings.db_path) as store:
        started = start_job(
            store, backend, settings.dataset_path, training_params(settings), settings.min_examples
        )
        on_update(JobStarted(started))
        if not watch:
            return TrainingOutcome(started.record, started)
        return _follow(settings, store, backend, started.record, on_update, started)


def watch_training(
    settings: Settings, job_id: str | None = None, on_update: Callable[[TrainingUpdate], None] = _ignore
) -> TrainingOutcome:
    """Follow a job (default: the newest) to its end, register and publish its model; raise if it did not succeed."""
    with Store(settings.db_path) as store:
        record = find_job(store, job_id)
        with open_backend(settings, record.backend.split(":", 1)[0]) as backend:
            return _follow(settings, store, backend, record, on_update)


def cancel_training(settings: Settings, job_id: str | None = None) -> FineTuneJob:
    """Ask the service to cancel a job (default: the newest) and record what it says."""
    with Store(settings.db_path) as store:
        record = find_job(store, job_id)
        with open_backend(settings, record.backend.split(":", 1)[0]) as backend:
            return cancel_job(store, backend, record)


def _follow(
    settings: Settings,
    store: Store,
    backend: FineTuneBackend,
    record: JobRecord,
    on_update: Callable[[TrainingUpdate], None],
    started: StartedJob | None = None,
) -> TrainingOutcome:
    from finetune_kit.training.sinks import publish_pending

    on_update(WatchStarted(record))
    every = polling(settings, backend.name)
    result = watch_job(store, backend, record, on_update, every, settings.workspace / "training")
    price = settings.price_for(record.base_model).training if backend.name != "local" else 0.0
    published = publish_pending(settings, store)  # this model, and any an earlier failed write left out
    outcome = TrainingOutcome(record, started, result, published, price)
    on_update(TrainingFinished(outcome))
    raise_if_unsuccessful(result.job)
    return outcome


__all__ = [
    "FineTuneBackend",
    "JobStarted",
    "TrainingFinished",
    "TrainingOutcome",
    "TrainingParams",
    "TrainingUpdate",
    "WatchStarted",
    "cancel_training",
    "open_backend",
    "polling",
    "run_training",
    "training_params",
    "watch_training",
]
