"""The one boundary every fine-tuning service sits behind, and the plain data it speaks in."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune_kit.config import setting_default

LATER_FIELDS = ("lora_rank", "lora_alpha", "max_length")
# Unset LoRA fields meant these defaults; now the settings spell them out, a job started before keeps its key.
UNSET_MEANT = {name: setting_default(name) for name in ("lora_rank", "lora_alpha")}
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
METRIC_FIELDS = {  # event data key -> job_metrics column
    "total_steps": "total_steps",
    "train_loss": "train_loss",
    "valid_loss": "valid_loss",
    "full_valid_loss": "full_valid_loss",
    "train_mean_token_accuracy": "train_accuracy",
    "valid_mean_token_accuracy": "valid_accuracy",
}


@dataclass(frozen=True)
class TrainingParams:
    """What a job is trained with; `None` hyperparameters are left to the service ("auto")."""

    base_model: str
    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    suffix: str | None = None
    seed: int | None = None
    lora_rank: int | None = None  # local backend only
    lora_alpha: int | None = None  # local backend only
    max_length: int | None = None  # local backend only: tokens per example

    def to_json(self) -> str:
        """A canonical JSON form: the job key hashes it, the jobs table stores it.

        Fields added after the first release are left out while unset (or at the default that unset meant), so a job
        started before them keeps its key.
        """
        values = asdict(self)
        for name in LATER_FIELDS:
            if values[name] is None or (name in UNSET_MEANT and values[name] == UNSET_MEANT[name]):
                del values[name]
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainingParams":
        """The params stored by `to_json`."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class DatasetFile:
    """One uploadable JSONL file and the hash that decides whether it was uploaded already."""

    path: Path
    sha256: str
    purpose: str = "fine-tune"


@dataclass(frozen=True)
class FineTuneJob:
    """A job as the service reports it."""

    id: str
    status: str
    base_model: str
    fine_tuned_model: str | None = None
    error: str | None = None
    estimated_finish: int | None = None  # unix seconds
    trained_tokens: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's log; metrics events carry `step`, `train_loss`, `valid_loss`… in `data`."""

    id: str
    created_at: int
    level: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def step_metrics(self) -> "StepMetrics | None":
        """The training metrics this event reports, if it is a metrics event."""
        step = self.data.get("step")
        if not isinstance(step, int | float):
            return None
        values = {column: self.data.get(key) for key, column in METRIC_FIELDS.items()}
        return StepMetrics(step=int(step), tokens_per_s=self.data.get("tokens_per_s"), **values)


@dataclass(frozen=True)
class StepMetrics:
    """The training metrics of one step."""

    step: int
    total_steps: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None
    train_accuracy: float | None = None
    valid_accuracy: float | None = None
    tokens_per_s: float | None = None  # reported by the local trainer; not stored in job_metrics


@dataclass(frozen=True)
class Checkpoint:
    """A model saved during training, usable like the final one."""

    id: str
    step: int
    model: str
    metrics: dict[str, float] = field(default_factory=dict)


class FineTuneBackend(Protocol):
    """A fine-tuning service: the hosted OpenAI/Azure API, or local LoRA training."""

    name: str  # "openai", "local"
    identity: str  # where its file and job ids are valid, e.g. "openai:https://api.openai.com/v1"

    def upload(self, file: DatasetFile) -> str:
        """Make `file` available to jobs; returns its file id."""
        ...

    def has_file(self, file_id: str) -> bool:
        """Whether an uploaded file is still there, as far as a check costing no request can tell."""
        ...

    def create_job(
        self,
        params: TrainingParams,
        train_file_id: str,
        validation_file_id: str | None,
        metadata: dict[str, str],
    ) -> FineTuneJob:
        """Start a job."""
        ...

    def find_job(self, metadata_key: str, value: str) -> FineTuneJob | None:
        """A job created earlier with this metadata, or None (re-attaches after a crash mid-create)."""
        ...

    def retrieve_job(self, job_id: str) -> FineTuneJob:
        """The job's current state."""
        ...

    def list_events(self, job_id: str, after: str | None) -> list[JobEvent]:
        """Events newer than the event id `after` (all when None), oldest first."""
        ...

    def cancel_job(self, job_id: str) -> FineTuneJob:
        """Ask the service to stop the job."""
        ...

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints, oldest first."""
        ...
