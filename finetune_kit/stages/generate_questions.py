"""Generate questions: N per chunk, parsed robustly, with a coverage ledger saying why a chunk got none."""

import hashlib
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field

from finetune_kit.config import Settings
from finetune_kit.errors import LLMError, RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.prompts import PromptTemplate, load_prompt
from finetune_kit.questions import Candidate, select_questions
from finetune_kit.stages import gather_all
from finetune_kit.store import Store, utc_now

MAX_ATTEMPTS = 3  # asks per chunk while the model's output yields no usable question


@dataclass
class QuestionReport:
    """What one generate-questions run did."""

    chunks_total: int = 0
    chunks_done_before: int = 0
    chunks_processed: int = 0
    questions_accepted: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    chunks_without_questions: Counter[str] = field(default_factory=Counter)


def generation_key(settings: Settings, template: PromptTemplate, endpoint_identity: str, model: str) -> str:
    """Identifies the question set a chunk gets under these settings; a change means new questions."""
    parts = [
        template.version,
        endpoint_identity,
        model,
        settings.product,
        settings.questions_per_chunk,
        settings.question_temperature,
        settings.question_max_tokens,
        settings.near_duplicate_threshold,
    ]
    return "g1:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def pending_chunks(store: Store, key: str) -> list[sqlite3.Row]:
    """Active chunks with no question set for `key` yet."""
    return store.db.execute(
        "SELECT id, text FROM chunks WHERE status = 'active' AND id NOT IN"
        " (SELECT chunk_id FROM question_sets WHERE generation_key = ?) ORDER BY document_id, seq",
        (key,),
    ).fetchall()


async def generate_questions(
    store: Store, client: LLMClient, settings: Settings, progress: Progress | None = None
) -> QuestionReport:
    """Give every active chunk N accepted questions or a recorded reason; skips chunks already done."""
    progress = progress or NoProgress()
    template = load_prompt("questions", settings.prompts_dir)
    key = generation_key(settings, template, client.endpoint.identity, client.endpoint.model)
    todo = pending_chunks(store, key)
    report = QuestionReport(
        chunks_total=int(store.scalar("SELECT count(*) FROM chunks WHERE status = 'active'") or 0)
    )
    report.chunks_done_before = report.chunks_total - len(todo)
    progress.start("generate questions", len(todo))

    async def one(chunk: sqlite3.Row) -> None:
        await _questions_for_chunk(store, client, settings, template, key, chunk, report)
        progress.advance()

    try:
        await gather_all([one(chunk) for chunk in todo])
    finally:
        progress.finish()
    if report.chunks_total and not store.scalar(
        "SELECT count(*) FROM questions WHERE generation_key = ? AND status = 'accepted'", (key,)
    ):
        raise LLMError(
            f"model '{client.endpoint.model}' produced no usable questions for any of {report.chunks_total} chunks"
            " — see `ftkit status` for the reasons; try a larger model with --model"
        )
    return report


async def _questions_for_chunk(
    store: Store,
    client: LLMClient,
    settings: Settings,
    template: PromptTemplate,
    key: str,
    chunk: sqlite3.Row,
    report: QuestionReport,
) -> None:
    prompt = template.render(product=settings.product, n=settings.questions_per_chunk, chunk=chunk["text"])
    wanted = settings.questions_per_chunk
    judged: list[Candidate] = []
    reason: str | None = None
    for attempt in range(MAX_ATTEMPTS):
        request = ChatRequest(
            stage="generate-questions",
            messages=(("user", prompt),),
            temperature=settings.question_temperature,
            max_tokens=settings.question_max_tokens,
            template_version=template.version,
            attempt=attempt,
            stop=(f"\n{wanted + 1}.",),  # small models go on listing; the first N are all we keep
        )
        try:
            result = await client.chat(request)
        except RequestRejectedError as exc:
            reason = f"request rejected by the endpoint: {exc}"
            break
        accepted = [c.text for c in judged if c.accepted]
        judged += select_questions(
            result.content,
            wanted,
            accepted,
            settings.near_duplicate_threshold,
            truncated=result.finish_reason == "length",
        )
        if any(c.accepted for c in judged):
            break  # a partial set is kept (and its shortfall recorded); re-asking is for chunks with nothing
    _save_question_set(store, chunk["id"], key, wanted, judged, reason, report)


def _coverage_reason(judged: list[Candidate], wanted: int, n_accepted: int) -> str | None:
    if n_accepted >= wanted:
        return None
    if not judged:
        return "no list of questions in the model's output"
    if n_accepted == 0:
        top = Counter(c.reason for c in judged if c.reason).most_common(1)[0][0]
        return f"every candidate rejected (mostly: {top})"
    return f"only {n_accepted} of {wanted} usable questions"


def _save_question_set(
    store: Store,
    chunk_id: str,
    key: str,
    wanted: int,
    judged: list[Candidate],
    reason: str | None,
    report: QuestionReport,
) -> None:
    n_accepted = sum(c.accepted for c in judged)
    reason = reason or _coverage_reason(judged, wanted, n_accepted)
    with store.transaction() as db:
        db.execute("DELETE FROM questions WHERE chunk_id = ? AND generation_key = ?", (chunk_id, key))
        for seq, candidate in enumerate(judged):
            question_id = "q1:" + hashlib.sha256(f"{chunk_id}\0{key}\0{seq}".encode()).hexdigest()[:24]
            db.execute(
                "INSERT INTO questions(id, chunk_id, generation_key, seq, text, status, reason) VALUES (?,?,?,?,?,?,?)",
                (
                    question_id,
                    chunk_id,
                    key,
                    seq,
                    candidate.text,
                    "accepted" if candidate.accepted else "rejected",
                    candidate.reason,
                ),
            )
        db.execute(
            "INSERT OR REPLACE INTO question_sets(chunk_id, generation_key, n_accepted, reason, created_at)"
            " VALUES (?,?,?,?,?)",
            (chunk_id, key, n_accepted, reason, utc_now()),
        )
    report.chunks_processed += 1
    report.questions_accepted += n_accepted
    report.rejects.update(c.reason for c in judged if c.reason)
    if n_accepted == 0:
        report.chunks_without_questions[reason or "unknown"] += 1
