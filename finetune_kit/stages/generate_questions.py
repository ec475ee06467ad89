"""Generate questions: N per chunk, parsed robustly, with a coverage ledger saying why a chunk got none."""

import contextlib
import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from finetune_kit.config import Settings
from finetune_kit.errors import LLMError, RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient, request_hash
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.prompts import FormatTemplates, PromptTemplate, load_format_templates, load_prompt
from finetune_kit.stages import Lookahead, Prefill, gather_all
from finetune_kit.stages.questions import Candidate, select_questions
from finetune_kit.store import Store, utc_now

MAX_ATTEMPTS = 3  # asks per chunk while the model's output yields no usable question
TOO_SMALL = "too small for questions"  # the coverage reason of a chunk that is never asked about
LOOKAHEAD = 2  # chunks asking at once, in windows of the client's concurrency, while their answers follow
Settled = Callable[[str], Awaitable[None]]  # run with a chunk's id once its question set is stored


@dataclass
class QuestionReport:
    """What one generate-questions run did."""

    chunks_total: int = 0
    chunks_done_before: int = 0
    chunks_processed: int = 0
    questions_accepted: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    chunks_without_questions: Counter[str] = field(default_factory=Counter)


def load_question_templates(settings: Settings) -> FormatTemplates:
    """Both question templates, from settings.prompts_dir or the bundled set."""
    return load_format_templates("questions", settings.prompts_dir)


def generation_key(settings: Settings, template: PromptTemplate, endpoint_identity: str, model: str) -> str:
    """Identifies the question set a chunk gets under these settings; a change means new questions.

    One key covers both templates (`template` is the docs one), so build-dataset and status find every chunk's
    questions with it; a request still carries only its own template's version, so editing one template leaves
    the other's answers in the request cache.
    """
    parts = [
        template.version,
        load_prompt("code_questions", settings.prompts_dir).version,
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
        "SELECT c.id, c.text, c.n_tokens, d.format FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE c.status = 'active' AND c.id NOT IN"
        " (SELECT chunk_id FROM question_sets WHERE generation_key = ?) ORDER BY c.document_id, c.seq",
        (key,),
    ).fetchall()


def question_floor(settings: Settings) -> int:
    """Chunks smaller than this (a quarter of chunk_min_tokens: a heading and a few words) are never asked about."""
    return settings.chunk_min_tokens // 4


def too_small_for_questions(chunk: sqlite3.Row, settings: Settings) -> bool:
    """A chunk that merging could not grow past the question floor holds too little to ask about."""
    return int(chunk["n_tokens"]) < question_floor(settings)


def question_request(
    settings: Settings, template: PromptTemplate, chunk_text: str, attempt: int
) -> ChatRequest:
    """The request that asks for a chunk's questions (a re-ask differs only in `attempt`)."""
    wanted = settings.questions_per_chunk
    return ChatRequest(
        stage="generate-questions",
        messages=(("user", template.render(product=settings.product, n=wanted, chunk=chunk_text)),),
        temperature=settings.question_temperature,
        max_tokens=settings.question_max_tokens,
        template_version=template.version,
        attempt=attempt,
        stop=(f"\n{wanted + 1}.",),  # small models go on listing; the first N are all we keep
    )


async def generate_questions(
    store: Store,
    client: LLMClient,
    settings: Settings,
    progress: Progress | None = None,
    prefill: Prefill | None = None,
    on_settled: Settled | None = None,
) -> QuestionReport:
    """Give every active chunk N accepted questions or a recorded reason; skips chunks already done.

    A chunk whose answer held no usable question is asked again at once, up to MAX_ATTEMPTS, and its question set
    is saved as soon as it is settled; `on_settled` (`ftkit run`: its answers) then runs for it in the same stream.
    `prefill` (the Batch API) asks in rounds instead, since a batch is one round: the whole round is fetched into
    the cache before it is read and a re-ask waits for the next round; `on_settled` needs live calls.
    """
    if prefill is not None and on_settled is not None:
        raise ValueError("on_settled streams live calls; with a prefill, answer after the last round")
    progress = progress or NoProgress()
    templates = load_question_templates(settings)
    key = generation_key(settings, templates.docs, client.endpoint.identity, client.endpoint.model)
    todo = pending_chunks(store, key)
    report = QuestionReport(
        chunks_total=int(store.scalar("SELECT count(*) FROM chunks WHERE status = 'active'"))
    )
    report.chunks_done_before = report.chunks_total - len(todo)
    small = [chunk for chunk in todo if too_small_for_questions(chunk, settings)]
    for chunk in small:  # recorded with its reason, so status shows it and no call is ever made for it
        reason = f"{TOO_SMALL} (under {question_floor(settings)} tokens; see chunk_min_tokens)"
        _save_question_set(store, chunk["id"], key, settings.questions_per_chunk, [], reason, report)
    todo = [chunk for chunk in todo if not too_small_for_questions(chunk, settings)]
    run = _QuestionRun(store, client, settings, templates, key, report, progress, prefill)
    progress.start("generate questions", len(todo))
    try:
        if prefill is None:
            await run.ask_each(todo, on_settled)
        else:
            for attempt in range(MAX_ATTEMPTS):
                todo = await run.ask_round(todo, attempt)
    finally:
        progress.finish()
    _fail_if_nothing_usable(store, key, client.endpoint.model, report)
    return report


@dataclass
class _QuestionRun:
    """One generate-questions run: asks chunks and saves each chunk's question set once it is settled."""

    store: Store
    client: LLMClient
    settings: Settings
    templates: FormatTemplates
    key: str
    report: QuestionReport
    progress: Progress
    prefill: Prefill | None
    judged: dict[str, list[Candidate]] = field(default_factory=dict)

    def request(self, chunk: sqlite3.Row, attempt: int) -> ChatRequest:
        """The request of `chunk`'s attempt number `attempt`."""
        template = self.templates.for_format(chunk["format"])
        return question_request(self.settings, template, chunk["text"], attempt)

    async def ask_each(self, chunks: list[sqlite3.Row], on_settled: Settled | None) -> None:
        """Ask every chunk until it is settled, then run `on_settled` for it (live calls: no rounds).

        With `on_settled`, only about two windows of chunks ask at once, so the requests it makes wait behind
        that many question requests rather than behind every chunk's.
        """
        gate = Lookahead(lambda: LOOKAHEAD * self.client.limiter.concurrency) if on_settled else None

        async def settle(chunk: sqlite3.Row) -> None:
            async with gate or contextlib.nullcontext():
                for attempt in range(MAX_ATTEMPTS):
                    if await self.ask(chunk, self.request(chunk, attempt), attempt, {}):
                        break
            if on_settled is not None:
                await on_settled(chunk["id"])

        await gather_all([settle(chunk) for chunk in chunks])

    async def ask_round(self, chunks: list[sqlite3.Row], attempt: int) -> list[sqlite3.Row]:
        """Ask every chunk once; returns the chunks to ask again (their output held no usable question)."""
        requests = {chunk["id"]: self.request(chunk, attempt) for chunk in chunks}
        failed = await self.prefill(list(requests.values())) if self.prefill and requests else {}
        again: list[sqlite3.Row] = []

        async def ask(chunk: sqlite3.Row) -> None:
            if not await self.ask(chunk, requests[chunk["id"]], attempt, failed):
                again.append(chunk)

        await gather_all([ask(chunk) for chunk in chunks])
        return again

    async def ask(
        self, chunk: sqlite3.Row, request: ChatRequest, attempt: int, failed: dict[str, str]
    ) -> bool:
        """Ask `chunk` once; True once its question set is saved, False to ask again (nothing usable yet)."""
        judged = self.judged.setdefault(chunk["id"], [])
        reason = await _ask(self.client, self.settings, request, judged, failed)
        if reason is None and not any(c.accepted for c in judged) and attempt + 1 < MAX_ATTEMPTS:
            return False
        wanted = self.settings.questions_per_chunk
        _save_question_set(self.store, chunk["id"], self.key, wanted, judged, reason, self.report)
        self.progress.advance()
        return True


async def _ask(
    client: LLMClient,
    settings: Settings,
    request: ChatRequest,
    judged: list[Candidate],
    failed: dict[str, str],
) -> str | None:
    """Ask once and judge the output into `judged`; returns why the chunk cannot be asked again, if so."""
    if (batch_error := failed.get(request_hash(client.endpoint, request))) is not None:
        return f"batch request failed: {batch_error}"
    try:
        result = await client.chat(request)
    except RequestRejectedError as exc:
        return f"request rejected by the endpoint: {exc}"
    accepted = [c.text for c in judged if c.accepted]
    judged += select_questions(
        result.content,
        settings.questions_per_chunk,
        accepted,
        settings.near_duplicate_threshold,
        truncated=result.finish_reason == "length",
    )
    return None


def _fail_if_nothing_usable(store: Store, key: str, model: str, report: QuestionReport) -> None:
    """A model that produced nothing usable for any chunk is a configuration problem, not a coverage gap."""
    accepted = store.scalar(
        "SELECT count(*) FROM questions WHERE generation_key = ? AND status = 'accepted'", (key,)
    )
    too_small = store.scalar(
        "SELECT count(*) FROM question_sets WHERE generation_key = ? AND reason LIKE ?",
        (key, TOO_SMALL + "%"),
    )
    if report.chunks_total > too_small and not accepted:
        raise LLMError(
            f"model '{model}' produced no usable questions for any of {report.chunks_total} chunks"
            " — see `ftkit status` for the reasons; try a larger model with --model"
        )


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
