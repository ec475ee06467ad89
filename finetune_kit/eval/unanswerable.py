"""Unanswerable questions for an eval, so that refusal accuracy measures refusals and not only answers.

They are the questions calibration asks the model for (plausible support questions about what the docs do not
describe; one cached call, the same request, so a calibrated workspace pays nothing) and they are checked the
same way (retrieval/calibrate.checked_negatives): one the index's words or the workspace's questions may answer
is dropped.
"""

import hashlib
from collections.abc import Sequence

from finetune_kit.config import Settings
from finetune_kit.eval.questions import EvalQuestion
from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient, cached_result, request_hash
from finetune_kit.retrieval.calibrate import (
    OFF_TOPIC,
    ask_for_negatives,
    checked_negatives,
    negatives_request,
    parse_negatives,
    positive_questions,
    section_headings,
)
from finetune_kit.store import Store

ORIGIN = "generated unanswerable"


def unchecked_because(store: Store) -> str | None:
    """Why generated questions cannot be checked here (no index holds the docs' words), or None."""
    from finetune_kit.retrieval.index import index_state

    state = index_state(store)
    if state is None or state.n_chunks == 0:
        return "no index to check them against — run `ftkit index`, or pass --no-unanswerable"
    return None


def request(store: Store, settings: Settings) -> ChatRequest:
    """The one request that asks for them: calibration's, so either one's answer serves both."""
    return negatives_request(settings, section_headings(store))


async def generate(
    client: LLMClient, store: Store, settings: Settings, asked: Sequence[EvalQuestion]
) -> tuple[list[EvalQuestion], str]:
    """The checked unanswerable questions (through the cached client), and a note on how many were kept."""
    written = await ask_for_negatives(client, settings, section_headings(store))
    return checked(store, settings, written, asked)


def cached(
    store: Store, settings: Settings, endpoint: Endpoint, asked: Sequence[EvalQuestion]
) -> tuple[list[EvalQuestion], str] | None:
    """What `generate` would return, from the cache alone (a dry run calls nothing); None when not cached."""
    result = cached_result(store, request_hash(endpoint, request(store, settings)))
    if result is None:
        return None
    return checked(store, settings, parse_negatives(result.content, settings), asked)


def checked(
    store: Store, settings: Settings, written: Sequence[str], asked: Sequence[EvalQuestion]
) -> tuple[list[EvalQuestion], str]:
    """The written questions that pass the check, as eval questions, and what the check did in one note."""
    written = [q for q in written if q not in OFF_TOPIC]
    known = [p.text for p in positive_questions(store)] + [q.question for q in asked]
    kept, dropped = checked_negatives(store, settings, written, known)
    why = "; ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
    note = f"{len(kept)} generated unanswerable questions ({len(kept)} of {len(written)} the model wrote kept"
    note += f"; dropped as maybe answerable — {why})" if why else ")"
    questions = [
        EvalQuestion(
            id="u:" + hashlib.sha256(text.encode()).hexdigest()[:12],
            question=text,
            answerable=False,
            origin=ORIGIN,
        )
        for text in kept
    ]
    return questions, note
