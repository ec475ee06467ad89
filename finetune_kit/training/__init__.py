"""Fine-tuning: one FineTuneBackend per service (hosted OpenAI/Azure, local LoRA), a watch loop, a registry."""

import contextlib
from collections.abc import Iterator

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.training.backend import FineTuneBackend, TrainingError, TrainingParams
from finetune_kit.training.watch import Polling

DEFAULT_BASE_MODELS = {"openai": "gpt-4o-mini-2024-07-18", "local": LOCAL_MODEL_ALIAS}


def training_params(settings: Settings) -> TrainingParams:
    """The job's parameters from the settings (`None` leaves a hyperparameter to the service)."""
    backend = settings.resolved_training_backend
    return TrainingParams(
        base_model=settings.base_model or DEFAULT_BASE_MODELS.get(backend, ""),
        n_epochs=settings.epochs,
        batch_size=settings.training_batch_size,
        learning_rate_multiplier=settings.learning_rate_multiplier,
        suffix=settings.training_suffix,
        seed=settings.training_seed,
        lora_rank=settings.lora_rank if backend == "local" else None,
        lora_alpha=settings.lora_alpha if backend == "local" else None,
        max_length=settings.training_max_length if backend == "local" else None,
    )


POLL_INTERVALS_S = {
    "openai": (10.0, 60.0),
    "local": (2.0, 10.0),
}  # (first, longest): a local job is a DB read


def polling(settings: Settings, backend: str | None = None) -> Polling:
    """How often the watch loop asks the service."""
    first, longest = POLL_INTERVALS_S[backend or settings.resolved_training_backend]
    return Polling(
        settings.training_poll_interval_s or first, settings.training_max_poll_interval_s or longest
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

    options = TrainerOptions(threads=settings.training_threads, launcher=tuple(settings.training_launcher))
    with Store(settings.db_path) as store:
        yield LocalBackend(store, settings.workspace, options)


__all__ = ["FineTuneBackend", "TrainingError", "TrainingParams", "open_backend", "polling", "training_params"]
