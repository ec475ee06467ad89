"""The library behind each CLI command: open the workspace, run stages in order, record the run."""

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune_kit.config import Settings
from finetune_kit.dataset_report import report_dataset
from finetune_kit.errors import ConfigError, FtkitError
from finetune_kit.llm.budget import Budget
from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient
from finetune_kit.llm.endpoint import endpoint_identity, open_endpoint
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.retrieval.index import IndexReport, update_index
from finetune_kit.stages import Prefill, gather_all
from finetune_kit.stages.build_dataset import (
    AnswerStream,
    DatasetReport,
    accepted_examples,
    answer_questions,
    write_dataset,
)
from finetune_kit.stages.curate import curated_examples, paraphrase_training_questions
from finetune_kit.stages.estimate import StageEstimate, estimate_generation
from finetune_kit.stages.generate_questions import QuestionReport, generate_questions
from finetune_kit.stages.ingest import IngestReport, ingest
from finetune_kit.stages.negatives import make_negatives
from finetune_kit.stages.refresh import RefreshReport, refresh_sources
from finetune_kit.stages.with_context import ContextExamples
from finetune_kit.status import answer_redo, current_keys, question_redo
from finetune_kit.store import Store, utc_now
from finetune_kit.workspace_lock import writer_lock

log = logging.getLogger(__name__)
DRY = " --dry-run"
BATCH_NEEDS_OPENAI = (
    "--batch uses the OpenAI Batch API — set OPENAI_API_KEY (or --provider openai), or drop --batch"
)


@dataclass
class RunSummary:
    """Everything `ftkit run` did, for the final table."""

    ingest: IngestReport | None = None
    questions: QuestionReport | None = None
    dataset: DatasetReport | None = None
    llm_calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    endpoint_identity: str = ""
    model: str = ""
    estimates: list[StageEstimate] = field(default_factory=list)  # dry runs only
    batch_ids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def recorded_run(settings: Settings, command: str) -> Iterator[tuple[Store, int]]:
    """Hold the workspace's writer lock, open its store and record one run of `command`, however it ends."""
    with writer_lock(settings.workspace, command), Store(settings.db_path) as store:
        store.mark_interrupted_runs()
        run_id = store.start_run(command)
        try:
            yield store, run_id
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            store.finish_run(run_id, status)
            raise
        store.finish_run(run_id, "ok")


def run_ingest(settings: Settings, specs: list[str], progress: Progress | None = None) -> IngestReport:
    """`ftkit ingest`: read sources into documents and chunks."""
    with recorded_run(settings, "ingest") as (store, _):
        return ingest(store, settings, specs, progress)


def run_index(settings: Settings, rebuild: bool = False, progress: Progress | None = None) -> IndexReport:
    """`ftkit index`: bring the search index up to date with the chunks (--rebuild: from nothing)."""
    if not settings.db_path.is_file():
        raise FtkitError(
            f"{settings.workspace}: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace"
        )
    with recorded_run(settings, "index" + " --rebuild" * rebuild) as (store, _):
        return update_index(store, settings, progress, rebuild=rebuild)


def run_refresh(
    settings: Settings, progress: Progress | None = None, generate: bool = False
) -> tuple[RefreshReport, RunSummary | None]:
    """`ftkit refresh`: read every known source again and re-index; `generate`: questions for chunks lacking them."""
    if not settings.db_path.is_file():
        raise FtkitError(
            f"{settings.workspace}: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace"
        )
    with recorded_run(settings, "refresh") as (store, run_id):
        report = refresh_sources(store, settings, progress)
        if not generate:
            return report, None
        summary = RunSummary()
        asyncio.run(_generation(store, settings, run_id, summary, progress or NoProgress(), answer=False))
        return report, summary


def run_generate_questions(
    settings: Settings, progress: Progress | None = None, dry_run: bool = False
) -> RunSummary:
    """`ftkit generate-questions` on every chunk that lacks questions (or, dry, what that would cost)."""
    with recorded_run(settings, "generate-questions" + DRY * dry_run) as (store, run_id):
        summary = RunSummary()
        if dry_run:
            summary.estimates = estimate_generation(store, settings, answers=False)
        else:
            asyncio.run(_generation(store, settings, run_id, summary, progress or NoProgress(), answer=False))
        return summary


def run_build_dataset(
    settings: Settings, progress: Progress | None = None, dry_run: bool = False
) -> RunSummary:
    """`ftkit build-dataset`: answer, write and validate the JSONL in settings.dataset_path (dry: the cost)."""
    with recorded_run(settings, "build-dataset" + DRY * dry_run) as (store, run_id):
        summary = RunSummary()
        if dry_run:
            summary.estimates = estimate_generation(store, settings, questions=False)
            return summary
        asyncio.run(_generation(store, settings, run_id, summary, progress or NoProgress(), questions=False))
        _write(store, settings, summary)
        return summary


def run_all(
    settings: Settings, specs: list[str], progress: Progress | None = None, dry_run: bool = False
) -> RunSummary:
    """`ftkit run`: ingest, ask, answer, write the JSONL in settings.dataset_path (dry: ingest, then estimate)."""
    progress = progress or NoProgress()
    with recorded_run(settings, "run" + DRY * dry_run) as (store, run_id):
        summary = RunSummary(ingest=ingest(store, settings, specs, progress))
        if dry_run:
            summary.estimates = estimate_generation(store, settings)
            return summary
        asyncio.run(_generation(store, settings, run_id, summary, progress))
        _write(store, settings, summary)
        return summary


async def _generation(
    store: Store,
    settings: Settings,
    run_id: int,
    summary: RunSummary,
    progress: Progress,
    questions: bool = True,
    answer: bool = True,
) -> None:
    if settings.batch and settings.resolved_provider != "openai":
        raise ConfigError(BATCH_NEEDS_OPENAI)
    stage = "generate-questions" if questions else "build-dataset"  # build-dataset alone asks nothing
    _note(progress, question_redo(store, settings, *endpoint_identity(settings), stage))
    with open_endpoint(settings) as endpoint:
        record_origins(store, settings, endpoint)
        client = LLMClient(
            endpoint,
            store,
            max_concurrency=settings.max_concurrency,
            max_retries=settings.max_retries,
            timeout_s=settings.request_timeout_s,
            run_id=run_id,
            budget=Budget(limit_usd=settings.max_cost_usd),
            requests_per_minute=settings.requests_per_minute,
            tokens_per_minute=settings.tokens_per_minute,
        )
        prefill = _batch_prefill(store, settings, endpoint, run_id, summary) if settings.batch else None
        try:
            if questions and answer and prefill is None:
                _note(progress, answer_redo(store, settings, endpoint.identity, endpoint.model))
                summary.questions, summary.dataset = await _ask_and_answer(store, client, settings, progress)
            else:  # one stage, or the Batch API's rounds: every question is stored before the answers' batch
                if questions:
                    summary.questions = await generate_questions(store, client, settings, progress, prefill)
                if answer:
                    _note(progress, answer_redo(store, settings, endpoint.identity, endpoint.model))
                    summary.dataset = await answer_questions(store, client, settings, progress, prefill)
            if answer and summary.dataset is not None:
                summary.dataset.paraphrases = await paraphrase_training_questions(
                    store, client, settings, summary.dataset, progress
                )
                summary.dataset.negatives = await make_negatives(
                    store,
                    client,
                    settings,
                    len(accepted_examples(store, settings, endpoint.identity, endpoint.model)),
                    summary.dataset.curation,
                    summary.dataset.notes,
                )
        finally:
            await client.close()
            _account(store, run_id, client, summary)
        summary.endpoint_identity, summary.model = endpoint.identity, endpoint.model


async def _ask_and_answer(
    store: Store, client: LLMClient, settings: Settings, progress: Progress
) -> tuple[QuestionReport, DatasetReport]:
    """Questions and answers in one stream: a chunk's answers are asked as soon as its questions are stored.

    Both stages share the one client, so its window and rate limiter pace them together, and a stop (a budget,
    a failure) stops both. Each bar advances as its stage's work is done.
    """
    answers = AnswerStream(store, client, settings, progress.beside())
    asked: list[QuestionReport] = []

    async def ask() -> None:
        asked.append(
            await generate_questions(store, client, settings, progress, on_settled=answers.answer_chunk)
        )

    try:
        await gather_all([ask(), answers.answer_left_over()])
    finally:
        answers.finish()
    return asked[0], answers.report


def _note(progress: Progress, line: str | None) -> None:
    """Say, before a stage starts, that it is about to make again work the workspace already holds."""
    if line is not None:
        log.info("%s", line)
        progress.note(line)


def record_origins(store: Store, settings: Settings, endpoint: Endpoint) -> None:
    """Remember which endpoint and model the current question and answer keys stand for (read by `ftkit status`)."""
    q_key, a_keys = current_keys(settings, endpoint.identity, endpoint.model)
    keys = [(q_key, "questions"), *((key, "answers") for key in a_keys.values())]
    with store.transaction() as db:
        db.executemany(
            "INSERT OR IGNORE INTO work_origins(key, stage, endpoint, model, recorded_at) VALUES (?, ?, ?, ?, ?)",
            [(key, stage, endpoint.identity, endpoint.model, utc_now()) for key, stage in keys],
        )


def _batch_prefill(
    store: Store, settings: Settings, endpoint: Endpoint, run_id: int, summary: RunSummary
) -> Prefill:
    """Fetch each round of requests through the OpenAI Batch API (half price) before the stage reads it."""
    from finetune_kit.llm.batch import prefill_with_batch

    async def prefill(requests: list[ChatRequest]) -> dict[str, str]:
        report = await prefill_with_batch(
            store,
            endpoint,
            requests,
            run_id=run_id,
            poll_interval_s=settings.batch_poll_interval_s,
            on_status=lambda status: log.info(
                "batch %s: %s (%d/%d done)", status.batch_id, status.status, status.completed, status.total
            ),
        )
        summary.batch_ids += report.batch_ids
        return report.failed

    return prefill


def _account(store: Store, run_id: int, client: LLMClient, summary: RunSummary) -> None:
    row = store.db.execute(
        "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0)"
        " FROM llm_calls WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    summary.prompt_tokens, summary.completion_tokens, summary.cost_usd = row[0], row[1], row[2]
    summary.llm_calls, summary.cache_hits = client.calls_made, client.cache_hits


def _write(store: Store, settings: Settings, summary: RunSummary) -> None:
    report = summary.dataset or DatasetReport()
    identity, model = summary.endpoint_identity, summary.model
    examples = (
        curated_examples(store, settings, identity, model, report.paraphrases, report) + report.negatives
    )
    context = None
    if settings.dataset_style == "with-context":  # the question among retrieved chunks, as the bot serves it
        context = ContextExamples(store, settings, report.curation, report.notes)
    record = context.record if context else None
    summary.dataset = write_dataset(examples, settings, settings.dataset_path, report, record)
    if context:
        context.finish()
    summary.files = [
        *summary.dataset.files,
        report_dataset(store, settings, identity, model, examples, report),
    ]
