"""Hosted fine-tuning through the `openai` SDK: OpenAI itself, or Azure OpenAI's v1 API at OPENAI_BASE_URL."""

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import openai
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from finetune_kit.errors import AuthenticationError, EndpointUnreachableError
from finetune_kit.training.backend import (
    Checkpoint,
    DatasetFile,
    FineTuneJob,
    JobEvent,
    TrainingError,
    TrainingParams,
)

log = logging.getLogger(__name__)

EVENTS_PAGE = 100
CLOSURE_HINT = (
    "OpenAI closed self-serve fine-tuning in 2026 (organisations that never fine-tuned are blocked since May 2026;"
    " new jobs stop for everyone on 2027-01-06) — use Azure OpenAI (set OPENAI_BASE_URL to your resource's"
    " /openai/v1/ endpoint) or train on your own machine with --backend local"
)


class OpenAIBackend:
    """A FineTuneBackend over the OpenAI fine-tuning API."""

    name = "openai"

    def __init__(
        self, base_url: str, api_key: str, *, timeout_s: float = 120.0, max_retries: int = 4
    ) -> None:
        self.identity = "openai:" + base_url.rstrip("/")
        self.sdk = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries
        )

    def close(self) -> None:
        """Close the HTTP connections."""
        self.sdk.close()

    def upload(self, file: DatasetFile) -> str:
        """Upload a JSONL file with purpose `fine-tune`."""
        with _api_errors("upload " + file.path.name), file.path.open("rb") as handle:
            uploaded = self.sdk.files.create(file=(file.path.name, handle), purpose="fine-tune")
        log.info("uploaded %s as %s", file.path, uploaded.id)
        return uploaded.id

    def has_file(self, file_id: str) -> bool:
        """Hosted files stay until someone deletes them; asking would cost a request per run."""
        return True

    def create_job(
        self,
        params: TrainingParams,
        train_file_id: str,
        validation_file_id: str | None,
        metadata: dict[str, str],
    ) -> FineTuneJob:
        """Start a supervised fine-tune; a 403 explains OpenAI's 2026 closure of self-serve fine-tuning."""
        hyperparameters: dict[str, Any] = {
            "n_epochs": params.n_epochs or "auto",
            "batch_size": params.batch_size or "auto",
            "learning_rate_multiplier": params.learning_rate_multiplier or "auto",
        }
        optional: dict[str, Any] = {
            name: value
            for name, value in (
                ("suffix", params.suffix),
                ("seed", params.seed),
                ("validation_file", validation_file_id),
            )
            if value is not None
        }
        with _api_errors("create the fine-tuning job", refused_hint=CLOSURE_HINT):
            job = self.sdk.fine_tuning.jobs.create(
                model=params.base_model,
                training_file=train_file_id,
                method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},  # type: ignore[arg-type]
                metadata=metadata,
                **optional,
            )
        return _job(job)

    def find_job(self, metadata_key: str, value: str) -> FineTuneJob | None:
        """The newest job whose metadata holds `metadata_key: value`."""
        with _api_errors("list fine-tuning jobs"):
            page = self.sdk.fine_tuning.jobs.list(metadata={metadata_key: value}, limit=10)
        jobs = [job for job in page.data if (job.metadata or {}).get(metadata_key) == value]
        return _job(jobs[0]) if jobs else None

    def retrieve_job(self, job_id: str) -> FineTuneJob:
        """The job's current state."""
        with _api_errors(f"read job {job_id}"):
            return _job(self.sdk.fine_tuning.jobs.retrieve(job_id))

    def list_events(self, job_id: str, after: str | None) -> list[JobEvent]:
        """Events newer than `after`, oldest first: pages newest-first until the known event is reached."""
        newest_first: list[FineTuningJobEvent] = []
        cursor: str | None = None
        with _api_errors(f"read the events of job {job_id}"):
            while True:
                if cursor:  # no `openai.omit` for "no cursor": older SDKs lack it
                    page = self.sdk.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PAGE, after=cursor)
                else:
                    page = self.sdk.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PAGE)
                for event in page.data:
                    if event.id == after:
                        return [_event(e) for e in reversed(newest_first)]
                    newest_first.append(event)
                if not page.has_more or not page.data:
                    return [_event(e) for e in reversed(newest_first)]
                cursor = page.data[-1].id

    def cancel_job(self, job_id: str) -> FineTuneJob:
        """Ask OpenAI to cancel the job."""
        with _api_errors(f"cancel job {job_id}"):
            return _job(self.sdk.fine_tuning.jobs.cancel(job_id))

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints, oldest first."""
        with _api_errors(f"read the checkpoints of job {job_id}"):
            page = self.sdk.fine_tuning.jobs.checkpoints.list(job_id, limit=100)
        checkpoints = [
            Checkpoint(
                id=c.id,
                step=c.step_number,
                model=c.fine_tuned_model_checkpoint,
                metrics={k: v for k, v in c.metrics.model_dump().items() if v is not None},
            )
            for c in page.data
        ]
        return sorted(checkpoints, key=lambda c: c.step)


def _job(job: FineTuningJob) -> FineTuneJob:
    return FineTuneJob(
        id=job.id,
        status=job.status,
        base_model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        error=f"{job.error.message} ({job.error.code})" if job.error and job.error.message else None,
        estimated_finish=job.estimated_finish,
        trained_tokens=job.trained_tokens,
        metadata=dict(job.metadata or {}),
    )


def _event(event: FineTuningJobEvent) -> JobEvent:
    data = event.data if isinstance(event.data, dict) else {}
    return JobEvent(
        id=event.id, created_at=event.created_at, level=event.level, message=event.message, data=data
    )


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    return f"HTTP {exc.status_code}: {message or exc.message}"


@contextlib.contextmanager
def _api_errors(doing: str, refused_hint: str | None = None) -> Iterator[None]:
    """Turn the SDK's failures into one-line ftkit errors naming what was being done and the fix."""
    try:
        yield
    except openai.AuthenticationError as exc:
        raise AuthenticationError(
            "the fine-tuning service rejected the API key — check OPENAI_API_KEY"
        ) from exc
    except openai.APIConnectionError as exc:
        raise EndpointUnreachableError(
            f"cannot reach the fine-tuning service to {doing} — check OPENAI_BASE_URL and the network;"
            " the job state is saved, re-run the command to continue"
        ) from exc
    except openai.PermissionDeniedError as exc:
        hint = refused_hint or "check that the key may use fine-tuning"
        raise TrainingError(f"cannot {doing}: {_message(exc)} — {hint}") from exc
    except openai.NotFoundError as exc:
        raise TrainingError(
            f"cannot {doing}: {_message(exc)} — `ftkit models` and the state DB list known jobs"
        ) from exc
    except openai.APIStatusError as exc:
        raise TrainingError(f"cannot {doing}: {_message(exc)}") from exc
