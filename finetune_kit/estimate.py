"""Dry runs: the calls, tokens and dollars a generation stage would spend, computed before anything is sent."""

from dataclasses import dataclass

from finetune_kit.config import Settings
from finetune_kit.llm.budget import prompt_tokens, worst_case_cost
from finetune_kit.llm.client import ChatRequest, Endpoint, cached_result, request_hash
from finetune_kit.llm.endpoint import endpoint_identity
from finetune_kit.stages.build_dataset import answer_request, load_answer_templates, planned_answer_requests
from finetune_kit.stages.generate_questions import (
    generation_key,
    load_question_templates,
    pending_chunks,
    question_request,
)
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


def planning_endpoint(settings: Settings) -> Endpoint:
    """The endpoint identity requests are hashed with, without starting or calling anything."""
    identity, model = endpoint_identity(settings)
    return Endpoint(base_url="", api_key="", model=model, identity=identity, price=settings.price_for(model))


def estimate_stage(
    stage: str, requests: list[ChatRequest], endpoint: Endpoint, factor: float, extrapolated: bool = False
) -> StageEstimate:
    """Totals for `requests` at the endpoint's price (times `factor`)."""
    return StageEstimate(
        stage=stage,
        calls=len(requests),
        prompt_tokens=sum(prompt_tokens(r) for r in requests),
        max_completion_tokens=sum(r.max_tokens for r in requests),
        max_cost_usd=sum(worst_case_cost(r, endpoint.price, factor) for r in requests),
        extrapolated=extrapolated,
    )


def estimate_generation(
    store: Store, settings: Settings, *, questions: bool = True, answers: bool = True
) -> list[StageEstimate]:
    """What generate-questions and build-dataset would spend now; cached calls cost nothing and are left out."""
    endpoint = planning_endpoint(settings)
    factor = BATCH_PRICE_FACTOR if settings.batch else 1.0

    def uncached(requests: list[ChatRequest]) -> list[ChatRequest]:
        return [r for r in requests if cached_result(store, request_hash(endpoint, r)) is None]

    templates = load_question_templates(settings)
    chunks = pending_chunks(
        store, generation_key(settings, templates.docs, endpoint.identity, endpoint.model)
    )
    estimates = []
    if questions:
        asks = uncached(
            [question_request(settings, templates.for_format(c["format"]), c["text"], 0) for c in chunks]
        )
        estimates.append(estimate_stage("generate-questions", asks, endpoint, factor))
    if answers:
        existing = uncached(planned_answer_requests(store, settings, endpoint.identity, endpoint.model))
        answer_templates = load_answer_templates(settings)
        future = [
            answer_request(
                settings, answer_templates.for_format(chunk["format"]), chunk["text"], TYPICAL_QUESTION
            )
            for chunk in (chunks if questions else [])
            for _ in range(settings.questions_per_chunk)
        ]
        estimates.append(estimate_stage("build-dataset", existing + future, endpoint, factor, bool(future)))
    return estimates
