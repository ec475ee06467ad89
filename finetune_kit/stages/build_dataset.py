"""Build the dataset: answer each question from its own chunk, reject bad answers, write and validate JSONL."""

import hashlib
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient, request_hash
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.prompts import (
    FormatTemplates,
    PromptTemplate,
    default_system_prompt,
    load_format_templates,
    load_prompt,
)
from finetune_kit.stages import Prefill, gather_all
from finetune_kit.stages.dataset import (
    Example,
    ValidationReport,
    held_out_chunks,
    to_record,
    validate_jsonl,
    write_jsonl,
)
from finetune_kit.stages.generate_questions import generation_key
from finetune_kit.stages.grounding import GroundingCheck, answer_status, grounding_key, reason_category
from finetune_kit.store import Store, utc_now

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|as an ai|i do not know|i don'?t know|unfortunately)"
    r"|(documentation|context|text|code) (provided )?(does not|doesn'?t) (contain|mention|say|provide|include)"
    r"|not (mentioned|provided|covered|specified) in the (documentation|context|text|code)",
    re.IGNORECASE,
)
_PROMPT_ECHO = ("documentation:", "question:")
# The answer key of a chunk's current answers (SQL; `d` is its document). Each template's answers have a key of
# their own: editing the code template re-answers only code chunks, and docs chunks' keys stay what they were.
CHUNK_ANSWER_KEY = "CASE d.format WHEN 'code' THEN :code_key ELSE :docs_key END"


@dataclass
class DatasetReport:
    """What one build-dataset run did and wrote."""

    answered: int = 0
    answers_accepted: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    grounding: Counter[str] = field(default_factory=Counter)  # what each grounding gate did
    curation: Counter[str] = field(default_factory=Counter)  # near duplicates dropped, paraphrases written
    paraphrases: list[Example] = field(default_factory=list)  # other phrasings of training questions
    negatives: list[Example] = field(default_factory=list)  # "I don't know" examples
    notes: list[str] = field(default_factory=list)  # what the run could not do as set, and why
    train: ValidationReport | None = None
    validation: ValidationReport | None = None
    estimated_training_tokens: int = 0
    estimated_cost_usd: float = 0.0
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(
        default_factory=list
    )  # each one line naming the fix; non-empty means unusable


def load_answer_templates(settings: Settings) -> FormatTemplates:
    """Both answer templates, from settings.prompts_dir or the bundled set."""
    return load_format_templates("answers", settings.prompts_dir)


def answer_key(settings: Settings, template: PromptTemplate, endpoint_identity: str, model: str) -> str:
    """Identifies the answers one template makes under these settings."""
    parts = [
        template.version,
        endpoint_identity,
        model,
        settings.product,
        settings.answer_temperature,
        settings.answer_max_tokens,
        *grounding_key(settings),
    ]
    return "a1:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def answer_keys(settings: Settings, endpoint_identity: str, model: str) -> dict[str, str]:
    """The answer keys of the current docs and code templates, as the parameters of CHUNK_ANSWER_KEY."""
    templates = load_answer_templates(settings)
    return {
        "docs_key": answer_key(settings, templates.docs, endpoint_identity, model),
        "code_key": answer_key(settings, templates.code, endpoint_identity, model),
    }


def judge_answer(text: str, finish_reason: str) -> str | None:
    """Why an answer cannot be a training target, or None if it can."""
    if not text.strip():
        return "empty answer"
    if finish_reason == "length":
        return "truncated (finish_reason=length)"
    if finish_reason == "content_filter":
        return "blocked by content filter"
    if _REFUSAL.search(text):
        return "refusal or non-answer"
    if any(marker in text.lower() for marker in _PROMPT_ECHO):
        return "echoes the prompt"
    return None


def answer_request(
    settings: Settings, template: PromptTemplate, chunk_text: str, question: str
) -> ChatRequest:
    """The request that answers `question` from its own chunk."""
    return ChatRequest(
        stage="build-dataset",
        messages=(("user", template.render(product=settings.product, chunk=chunk_text, question=question)),),
        temperature=settings.answer_temperature,
        max_tokens=settings.answer_max_tokens,
        template_version=template.version,
    )


def unanswered_questions(
    store: Store, settings: Settings, identity: str, model: str, chunk_id: str | None = None
) -> list[sqlite3.Row]:
    """Accepted questions of the current question set with no answer under the current settings (of one chunk)."""
    q_key = generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)
    return store.db.execute(
        "SELECT q.id, q.text, c.text AS chunk, d.format FROM questions q JOIN chunks c ON c.id = q.chunk_id"
        " JOIN documents d ON d.id = c.document_id"
        " WHERE c.status = 'active' AND q.generation_key = :q_key AND q.status = 'accepted' AND NOT EXISTS"
        f" (SELECT 1 FROM answers a WHERE a.question_id = q.id AND a.answer_key = {CHUNK_ANSWER_KEY})"
        " AND (:chunk_id IS NULL OR c.id = :chunk_id) ORDER BY c.document_id, c.seq, q.seq",
        {"q_key": q_key, "chunk_id": chunk_id, **answer_keys(settings, identity, model)},
    ).fetchall()


def planned_answer_requests(store: Store, settings: Settings, identity: str, model: str) -> list[ChatRequest]:
    """The requests build-dataset would make now for the questions that exist so far."""
    templates = load_answer_templates(settings)
    rows = unanswered_questions(store, settings, identity, model)
    return [
        answer_request(settings, templates.for_format(row["format"]), row["chunk"], row["text"])
        for row in rows
    ]


async def answer_questions(
    store: Store,
    client: LLMClient,
    settings: Settings,
    progress: Progress | None = None,
    prefill: Prefill | None = None,
) -> DatasetReport:
    """Answer every accepted question (of the current question set) that has no answer under these settings."""
    progress = progress or NoProgress()
    answering = _Answering(store, client, settings, DatasetReport())
    todo = unanswered_questions(store, settings, answering.identity, answering.model)
    if prefill and todo:
        await answering.prefill(prefill, todo)
    progress.start("answer questions", len(todo))
    try:
        await gather_all([answering.answer(row, progress) for row in todo])
    finally:
        progress.finish()
    return answering.report


class AnswerStream:
    """`ftkit run`'s answers beside its questions: a chunk's questions are answered as soon as they are stored.

    Live calls only: with the Batch API the answers wait for the question stage's last round (`answer_questions`).
    """

    def __init__(self, store: Store, client: LLMClient, settings: Settings, progress: Progress) -> None:
        self._answering = _Answering(store, client, settings, DatasetReport())
        self.report = self._answering.report
        self._progress = progress
        self._started = False
        # taken before the question stage stores anything: questions an earlier run stored but did not answer
        self._left_over = unanswered_questions(
            store, settings, self._answering.identity, self._answering.model
        )

    async def answer_left_over(self) -> None:
        """Answer the questions stored before this run that have no answer yet."""
        await self._answer(self._left_over)

    async def answer_chunk(self, chunk_id: str) -> None:
        """Answer the questions of `chunk_id` that need an answer (just stored: the question stage settled it)."""
        answering = self._answering
        await self._answer(
            unanswered_questions(
                answering.store, answering.settings, answering.identity, answering.model, chunk_id
            )
        )

    def finish(self) -> None:
        """The answers are over (the bar stays on screen)."""
        if self._started:
            self._progress.finish()

    async def _answer(self, rows: list[sqlite3.Row]) -> None:
        if not self._started:
            self._progress.start("answer questions", 0)
            self._started = True
        self._progress.grow(len(rows))
        await gather_all([self._answering.answer(row, self._progress) for row in rows])


@dataclass
class _Answering:
    """Answers, checks and saves one question at a time; one per run, shared by all its answers in flight."""

    store: Store
    client: LLMClient
    settings: Settings
    report: DatasetReport
    failed: dict[str, str] = field(default_factory=dict)  # batch request hash -> why the batch gave no answer

    def __post_init__(self) -> None:
        self.templates = load_answer_templates(self.settings)
        self.identity, self.model = self.client.endpoint.identity, self.client.endpoint.model
        self.grounding = GroundingCheck(self.client, self.settings, judge_answer, self.report.grounding)

    def request(self, row: sqlite3.Row) -> ChatRequest:
        """The request that answers the question in `row` from its chunk."""
        return answer_request(
            self.settings, self.templates.for_format(row["format"]), row["chunk"], row["text"]
        )

    async def prefill(self, prefill: Prefill, rows: list[sqlite3.Row]) -> None:
        """Fetch the answers, then their judges, of `rows` through `prefill` (the Batch API) into the cache."""
        self.failed = await prefill([self.request(row) for row in rows])
        pending = [(self.request(row), row["chunk"], row["text"]) for row in rows]
        await self.grounding.prefill_judges(prefill, pending, self.failed)

    async def answer(self, row: sqlite3.Row, progress: Progress) -> None:
        """Answer, check and save one question."""
        request = self.request(row)
        text, reason = await _answer(self.client, request, self.failed)
        if reason is None:
            text, reason = await self.grounding.check(request, row["chunk"], row["text"], text)
        key = answer_key(self.settings, self.templates.for_format(row["format"]), self.identity, self.model)
        _save_answer(self.store, row["id"], key, text, reason, self.report)
        progress.advance()


async def _answer(client: LLMClient, request: ChatRequest, failed: dict[str, str]) -> tuple[str, str | None]:
    """The answer's text and, if it cannot be a training target, why."""
    if (batch_error := failed.get(request_hash(client.endpoint, request))) is not None:
        return "", f"batch request failed: {batch_error}"
    try:
        result = await client.chat(request)
    except RequestRejectedError as exc:
        return "", f"request rejected by the endpoint: {exc}"
    return result.content.strip(), judge_answer(result.content, result.finish_reason)


def _save_answer(
    store: Store, question_id: str, key: str, text: str, reason: str | None, report: DatasetReport
) -> None:
    store.db.execute(
        "INSERT OR REPLACE INTO answers(question_id, answer_key, text, status, reason, created_at)"
        " VALUES (?,?,?,?,?,?)",
        (question_id, key, text, answer_status(reason), reason, utc_now()),
    )
    report.answered += 1
    report.answers_accepted += answer_status(reason) == "accepted"
    if answer_status(reason) == "rejected":
        report.rejects[reason_category(reason or "")] += 1


def accepted_examples(store: Store, settings: Settings, identity: str, model: str) -> list[Example]:
    """Every accepted question/answer pair of active chunks under the current settings."""
    q_key = generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)
    rows = store.db.execute(
        "SELECT q.chunk_id, q.text AS question, a.text AS answer FROM answers a"
        " JOIN questions q ON q.id = a.question_id JOIN chunks c ON c.id = q.chunk_id"
        " JOIN documents d ON d.id = c.document_id"
        f" WHERE c.status = 'active' AND q.generation_key = :q_key AND a.answer_key = {CHUNK_ANSWER_KEY}"
        " AND a.status = 'accepted' ORDER BY c.document_id, c.seq, q.seq",
        {"q_key": q_key, **answer_keys(settings, identity, model)},
    ).fetchall()
    return [Example(row["chunk_id"], row["question"], row["answer"]) for row in rows]


def write_dataset(
    examples: list[Example],
    settings: Settings,
    out_dir: Path,
    report: DatasetReport,
    record: Callable[[Example], dict[str, Any]] | None = None,
) -> DatasetReport:
    """Split by chunk, write train/validation JSONL, validate both and estimate training cost.

    `record` writes one line (with-context examples); default: the closed-book record of settings.dataset_format.
    """
    held_out = held_out_chunks(examples, settings.validation_fraction, settings.split_seed)
    system = default_system_prompt(settings) if settings.dataset_format == "chat" else None
    record = record or (lambda e: to_record(e, settings.dataset_format, system))
    limit = settings.example_token_limits.get(settings.fine_tune_base_model, 65_536)
    for name, part in (
        ("train", [e for e in examples if e.chunk_id not in held_out]),
        ("validation", [e for e in examples if e.chunk_id in held_out and not e.paraphrase]),
    ):
        path = out_dir / f"{name}.jsonl"
        write_jsonl(path, [record(e) for e in part])
        setattr(report, name, validate_jsonl(path, limit))
        report.files.append(path)
    assert report.train is not None
    report.estimated_training_tokens = report.train.tokens * settings.epochs
    report.estimated_cost_usd = (
        report.estimated_training_tokens * settings.price_for(settings.fine_tune_base_model).training / 1e6
    )
    report.problems = dataset_problems(report, settings)
    return report


def dataset_problems(report: DatasetReport, settings: Settings) -> list[str]:
    """What makes the written dataset unusable for fine-tuning, each naming the fix."""
    assert report.train is not None and report.validation is not None
    problems = []
    if errors := report.train.errors + report.validation.errors:
        problems.append(f"{errors[0]} ({len(errors)} malformed lines) — rebuild with `ftkit build-dataset`")
    if report.train.examples < settings.min_examples:
        problems.append(
            f"{report.train.path}: only {report.train.examples} training examples (need {settings.min_examples})"
            " — add documents, raise --questions-per-chunk, or lower --min-examples"
        )
    if report.train.over_limit:
        problems.append(
            f"{report.train.path}: {report.train.over_limit} examples exceed {settings.fine_tune_base_model}'s token limit"
            " — lower chunk_target_tokens or answer_max_tokens"
        )
    return problems
