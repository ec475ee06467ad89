"""Dry runs: the calls, tokens and dollars a generation stage would spend, computed before anything is sent."""

import sqlite3
from collections import Counter
from dataclasses import dataclass

from finetune_kit.config import Settings
from finetune_kit.llm.budget import prompt_tokens, worst_case_cost
from finetune_kit.llm.client import ChatRequest, Endpoint, cached_result, request_hash
from finetune_kit.llm.endpoint import endpoint_identity
from finetune_kit.prompts import FormatTemplates
from finetune_kit.stages.build_dataset import (
    answer_request,
    load_answer_templates,
    planned_answer_requests,
    unanswered_questions,
)
from finetune_kit.stages.generate_questions import (
    generation_key,
    load_question_templates,
    pending_chunks,
    question_floor,
    question_request,
    too_small_for_questions,
)
from finetune_kit.stages.grounding import JUDGE_STAGE, judge_request
from finetune_kit.store import Store

BATCH_PRICE_FACTOR = 0.5  # the Batch API bills half the standard price
TYPICAL_QUESTION = "How do I change this setting, and what is its default value when it is not set?"


@dataclass(frozen=True)
class StageEstimate:
    """What one stage would spend at most."""

    stage: str
    calls: int
    prompt_tokens: int
    max_completion_tokens: int
    max_cost_usd: float
    extrapolated: bool = False  # includes answers to questions that do not exist yet
    by_chunk_size: tuple[tuple[str, int], ...] = ()  # (size bucket, calls) for the chunks still to be asked


def planning_endpoint(settings: Settings) -> Endpoint:
    """The endpoint identity requests are hashed with, without starting or calling anything."""
    identity, model = endpoint_identity(settings)
    return Endpoint(base_url="", api_key="", model=model, identity=identity, price=settings.price_for(model))


def chunk_size_bucket(n_tokens: int, settings: Settings) -> str:
    """The size range (in tokens) a chunk falls in, bounded by an eighth, a quarter and half of the target."""
    tiny, target = question_floor(settings), settings.chunk_target_tokens
    if n_tokens < tiny:
        return f"under {tiny}"
    low = tiny
    for high in (target // 8, target // 4, target // 2, target):
        if n_tokens <= high:
            return f"{low}–{high}"
        low = max(low, high + 1)
    return f"over {target}"


def _calls_by_size(
    chunks: list[sqlite3.Row], calls_each: int, settings: Settings
) -> tuple[tuple[str, int], ...]:
    """Calls per chunk size bucket, smallest bucket first; chunks too small to ask about cost nothing."""
    calls: Counter[str] = Counter()
    for chunk in sorted(chunks, key=lambda c: int(c["n_tokens"])):
        asked = not too_small_for_questions(chunk, settings)
        calls[chunk_size_bucket(int(chunk["n_tokens"]), settings)] += calls_each if asked else 0
    return tuple(calls.items())


def estimate_stage(
    stage: str,
    requests: list[ChatRequest],
    endpoint: Endpoint,
    factor: float,
    extrapolated: bool = False,
    by_chunk_size: tuple[tuple[str, int], ...] = (),
) -> StageEstimate:
    """Totals for `requests` at the endpoint's price (times `factor`)."""
    return StageEstimate(
        stage=stage,
        calls=len(requests),
        prompt_tokens=sum(prompt_tokens(r) for r in requests),
        max_completion_tokens=sum(r.max_tokens for r in requests),
        max_cost_usd=sum(worst_case_cost(r, endpoint.price, factor) for r in requests),
        extrapolated=extrapolated,
        by_chunk_size=by_chunk_size,
    )


def estimate_generation(
    store: Store, settings: Settings, *, questions: bool = True, answers: bool = True
) -> list[StageEstimate]:
    """What generate-questions and build-dataset would spend now; cached calls cost nothing and are left out."""
    endpoint = planning_endpoint(settings)
    factor = BATCH_PRICE_FACTOR if settings.batch else 1.0
    templates = load_question_templates(settings)
    chunks = pending_chunks(
        store, generation_key(settings, templates.docs, endpoint.identity, endpoint.model)
    )
    estimates = []
    if questions:
        estimates.append(_question_estimate(store, settings, endpoint, factor, templates, chunks))
    if answers:
        asked = [c for c in chunks if questions and not too_small_for_questions(c, settings)]
        estimates.append(_answer_estimate(store, settings, endpoint, factor, asked))
        if settings.grounding_judge:
            estimates.append(_judge_estimate(store, settings, endpoint, factor, asked))
    return estimates


def _uncached(store: Store, endpoint: Endpoint, request: ChatRequest) -> bool:
    return cached_result(store, request_hash(endpoint, request)) is None


def _question_estimate(
    store: Store,
    settings: Settings,
    endpoint: Endpoint,
    factor: float,
    templates: FormatTemplates,
    chunks: list[sqlite3.Row],
) -> StageEstimate:
    """One question call per chunk big enough to ask about and not in the cache."""
    asked = [
        (chunk, question_request(settings, templates.for_format(chunk["format"]), chunk["text"], 0))
        for chunk in chunks
        if not too_small_for_questions(chunk, settings)
    ]
    asked = [(chunk, r) for chunk, r in asked if _uncached(store, endpoint, r)]
    unasked = [chunk for chunk in chunks if too_small_for_questions(chunk, settings)]
    sizes = _calls_by_size([chunk for chunk, _ in asked] + unasked, 1, settings)
    return estimate_stage("generate-questions", [r for _, r in asked], endpoint, factor, False, sizes)


def _answer_estimate(
    store: Store, settings: Settings, endpoint: Endpoint, factor: float, future_chunks: list[sqlite3.Row]
) -> StageEstimate:
    """Answers to the questions that exist, plus N per chunk still to be asked (sized with a typical question)."""
    planned = planned_answer_requests(store, settings, endpoint.identity, endpoint.model)
    existing = [r for r in planned if _uncached(store, endpoint, r)]
    answer_templates = load_answer_templates(settings)
    future = [
        answer_request(
            settings, answer_templates.for_format(chunk["format"]), chunk["text"], TYPICAL_QUESTION
        )
        for chunk in future_chunks
        for _ in range(settings.questions_per_chunk)
    ]
    sizes = _calls_by_size(future_chunks, settings.questions_per_chunk, settings)
    return estimate_stage("build-dataset", existing + future, endpoint, factor, bool(future), sizes)


def _judge_estimate(
    store: Store, settings: Settings, endpoint: Endpoint, factor: float, future_chunks: list[sqlite3.Row]
) -> StageEstimate:
    """One grounding judge call per answer still to be made, sized with an answer of answer_max_tokens words."""
    answer = " ".join(["word"] * settings.answer_max_tokens)
    rows = unanswered_questions(store, settings, endpoint.identity, endpoint.model)
    asked = [(row["chunk"], row["text"]) for row in rows]
    asked += [
        (c["text"], TYPICAL_QUESTION) for c in future_chunks for _ in range(settings.questions_per_chunk)
    ]
    requests = [judge_request(settings, chunk, question, answer, 0) for chunk, question in asked]
    sizes = _calls_by_size(future_chunks, settings.questions_per_chunk, settings)
    return estimate_stage(JUDGE_STAGE, requests, endpoint, factor, bool(future_chunks), sizes)
