"""Hosted fine-tuning through the `openai` SDK: OpenAI itself, or Azure OpenAI's v1 API at OPENAI_BASE_URL."""

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

from finetune_kit.llm.api import ApiCall, RetryPolicy, Wording, request_sync, sync_client
from finetune_kit.training.backend import Checkpoint, DatasetFile, FineTuneJob, JobEvent, TrainingParams

log = logging.getLogger(__name__)

T = TypeVar("T")

EVENTS_PAGE = 100
CLOSURE_HINT = (
    "OpenAI closed self-serve fine-tuning in 2026 (organisations that never fine-tuned are blocked since May 2026;"
    " new jobs stop for everyone on 2027-01-06) — use Azure OpenAI (set OPENAI_BASE_URL to your resource's"
    " /openai/v1/ endpoint) or train on your own machine with --backend local"
)
TRAINING_WORDING = Wording(
    refused_key="the fine-tuning service rejected the API key — check OPENAI_API_KEY",
    unreachable="cannot reach the fine-tuning service to {doing} — check OPENAI_BASE_URL and the network;"
    " the job state is saved, re-run the command to continue",
    forbidden="cannot {doing}: HTTP {status}: {reason} — check that the key may use fine-tuning",
    not_found="cannot {doing}: HTTP {status}: {reason} — `ftkit models` and the state DB list known jobs",
    rejected="cannot {doing}: HTTP {status}: {reason}",
    failed="cannot {doing}: HTTP {status}: {reason}",
)
# Creating a job is where OpenAI's 2026 closure of self-serve fine-tuning shows, as a 403.
CREATE_WORDING = dataclasses.replace(
    TRAINING_WORDING, forbidden="cannot {doing}: HTTP {status}: {reason} — " + CLOSURE_HINT
)


class OpenAIBackend:
    """A FineTuneBackend over the OpenAI fine-tuning API."""

    name = "openai"

    def __init__(
        self, base_url: str, api_key: str, *, timeout_s: float = 120.0, max_retries: int = 4
    ) -> None:
        self.identity = "openai:" + base_url.rstrip("/")
        self.sdk = sync_client(base_url, api_key, timeout_s=timeout_s)
        self._call = ApiCall(base_url, api_key, TRAINING_WORDING)
        self._policy = RetryPolicy(max_retries)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.sdk.close()

    def _request(self, send: Callable[[], T], doing: str, wording: Wording = TRAINING_WORDING) -> T:
        """One call to the fine-tuning service, retried by the shared policy, its failure naming the fix."""
        return request_sync(send, dataclasses.replace(self._call, doing=doing, wording=wording), self._policy)

    def upload(self, file: DatasetFile) -> str:
        """Upload a JSONL file with purpose `fine-tune`."""

        def send() -> Any:
            with file.path.open("rb") as handle:  # opened per try: a retry sends the whole file again
                return self.sdk.files.create(file=(file.path.name, handle), purpose="fine-tune")

        uploaded = self._request(send, "upload " + file.path.name)
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
        job = self._request(
            lambda: self.sdk.fine_tuning.jobs.create(
                model=params.base_model,
                training_file=train_file_id,
                method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},  # type: ignore[arg-type]
                metadata=metadata,
                **optional,
            ),
            "create the fine-tuning job",
            CREATE_WORDING,
        )
        return _job(job)

    def find_job(self, metadata_key: str, value: str) -> FineTuneJob | None:
        """The newest job whose metadata holds `metadata_key: value`."""
        page = self._request(
            lambda: self.sdk.fine_tuning.jobs.list(metadata={metadata_key: value}, limit=10),
            "list fine-tuning jobs",
        )
        jobs = [job for job in page.data if (job.metadata or {}).get(metadata_key) == value]
        return _job(jobs[0]) if jobs else None

    def retrieve_job(self, job_id: str) -> FineTuneJob:
        """The job's current state."""
        return _job(self._request(lambda: self.sdk.fine_tuning.jobs.retrieve(job_id), f"read job {job_id}"))

    def list_events(self, job_id: str, after: str | None) -> list[JobEvent]:
        """Events newer than `after`, oldest first: pages newest-first until the known event is reached."""
        newest_first: list[FineTuningJobEvent] = []
        cursor: str | None = None
        while True:
            page = self._request(
                functools.partial(self._events_page, job_id, cursor), f"read the events of job {job_id}"
            )
            for event in page.data:
                if event.id == after:
                    return [_event(e) for e in reversed(newest_first)]
                newest_first.append(event)
            if not page.has_more or not page.data:
                return [_event(e) for e in reversed(newest_first)]
            cursor = page.data[-1].id

    def _events_page(self, job_id: str, cursor: str | None) -> Any:
        if cursor:  # no `openai.omit` for "no cursor": older SDKs lack it
            return self.sdk.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PAGE, after=cursor)
        return self.sdk.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PAGE)

    def cancel_job(self, job_id: str) -> FineTuneJob:
        """Ask OpenAI to cancel the job."""
        return _job(self._request(lambda: self.sdk.fine_tuning.jobs.cancel(job_id), f"cancel job {job_id}"))

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints, oldest first."""
        page = self._request(
            lambda: self.sdk.fine_tuning.jobs.checkpoints.list(job_id, limit=100),
            f"read the checkpoints of job {job_id}",
        )
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
