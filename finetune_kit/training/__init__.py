"""Fine-tuning: one FineTuneBackend per service (hosted OpenAI/Azure now, local LoRA next), a watch loop, a registry."""

import contextlib
from collections.abc import Iterator

from finetune_kit.config import Settings
from finetune_kit.training.backend import FineTuneBackend, TrainingError, TrainingParams
from finetune_kit.training.watch import Polling

DEFAULT_BASE_MODELS = {"openai": "gpt-4o-mini-2024-07-18"}


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
    )


def polling(settings: Settings) -> Polling:
    """How often the watch loop asks the service."""
    return Polling(settings.training_poll_interval_s, settings.training_max_poll_interval_s)


@contextlib.contextmanager
def open_backend(settings: Settings, name: str | None = None) -> Iterator[FineTuneBackend]:
    """The fine-tuning service `name` (default: the one the settings select), open for the context."""
    if (name or settings.resolved_training_backend) == "local":
        raise TrainingError(
            "the local LoRA backend is not available yet — export OPENAI_API_KEY (or point OPENAI_BASE_URL at"
            " Azure OpenAI) and use --backend openai"
        )
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


__all__ = ["FineTuneBackend", "TrainingError", "TrainingParams", "open_backend", "polling", "training_params"]
