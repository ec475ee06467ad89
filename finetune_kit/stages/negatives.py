""" "I don't know" examples: questions the docs do not answer, each with the refusal the bot gives.

The model writes questions in the product's voice about what the docs lack (prompts/negatives.txt, a round of
GENERATED_NEGATIVES per call, more rounds while too few are kept). One is kept only if retrieval finds no chunk
that answers it — the checks calibration uses (retrieval/calibrate.py: it names something the docs never mention,
it is no near copy of a workspace question) and, once a threshold is known, a relevance below it — and a judge
call, shown what the search found, confirms the docs do not answer it. Its target is retrieval/answer.py's
refusal, naming support_contact. Every call is cached and rounds and candidates are taken in a fixed order, so a
re-run asks nothing and a larger negatives_fraction asks only for the negatives it adds.
"""

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError, RetrievalIndexError, VagueQueryError
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.prompts import load_prompt
from finetune_kit.retrieval import calibrate
from finetune_kit.retrieval.answer import Retrieval, format_context, refusal_text, retrieve
from finetune_kit.retrieval.calibrate import (
    parse_negatives,
    positive_questions,
    section_headings,
    why_not_a_negative,
)
from finetune_kit.retrieval.search import Retriever
from finetune_kit.retrieval.terms import docs_vocabulary
from finetune_kit.stages.dataset import Example
from finetune_kit.store import Store

STAGE = "negatives"
JUDGE_STAGE = "negatives-judge"
JUDGE_ATTEMPTS = 2  # judge calls per question while its reply holds no verdict
JUDGE_MAX_TOKENS = 20
MAX_ROUNDS = 8  # generation calls at most, however few of their questions are kept
CHUNK_PREFIX = "negative:"  # an "I don't know" example's chunk id: it has no chunk, and splits on its own
KEPT = "negatives"
NO_INDEX = 'no "I don\'t know" examples: they need the search index'
_VERDICT = re.compile(r"verdict\W*(not answered|unanswered|answered)", re.I)


@dataclass(frozen=True)
class Candidate:
    """A generated question and what retrieval made of it."""

    question: str
    retrieval: Retrieval


def wanted(settings: Settings, n_examples: int) -> int:
    """How many "I don't know" examples `n_examples` answered ones call for."""
    return math.ceil(settings.negatives_fraction * n_examples) if n_examples else 0


def negatives_request(settings: Settings, headings: Sequence[str], round_: int) -> ChatRequest:
    """Generation round `round_` (its seed differs, so its sampled questions do too)."""
    return calibrate.negatives_request(settings, headings, prompt="negatives", stage=STAGE, attempt=round_)


def judge_request(settings: Settings, candidate: Candidate, attempt: int) -> ChatRequest:
    """The call that confirms the retrieved passages do not answer the question."""
    template = load_prompt("negatives_judge", settings.prompts_dir)
    sources = format_context(candidate.retrieval.hits) or "(the search found nothing)"
    prompt = template.render(product=settings.product, sources=sources, question=candidate.question)
    return ChatRequest(
        stage=JUDGE_STAGE,
        messages=(("user", prompt),),
        temperature=0.0 if attempt == 0 else 0.7,
        max_tokens=JUDGE_MAX_TOKENS,
        template_version=template.version,
        attempt=attempt,
    )


def parse_verdict(text: str) -> bool | None:
    """True when the judge says the docs do not answer, False when they do, None when it never said."""
    match = _VERDICT.search(text) or _VERDICT.search("verdict: " + text.strip().split("\n", 1)[0][:40])
    if match is None:
        return None
    return match.group(1).lower() != "answered"


def negative_example(settings: Settings, candidate: Candidate) -> Example:
    """The example: the question and the refusal the bot gives to it."""
    digest = hashlib.sha256(candidate.question.encode()).hexdigest()[:16]
    answer = refusal_text(settings, candidate.question, candidate.retrieval.unknown)
    return Example(CHUNK_PREFIX + digest, candidate.question, answer, negative=True)


class NegativeMaker:
    """Writes and checks "I don't know" questions for one build, counting why each was set aside."""

    def __init__(self, store: Store, client: LLMClient, settings: Settings, counts: Counter[str]) -> None:
        self.store, self.client, self.settings, self.counts = store, client, settings, counts
        self.retriever = Retriever.open(store, settings)
        self.positives = [p.text for p in positive_questions(store)]
        self.docs_have = docs_vocabulary(store)
        self.headings = section_headings(store)

    async def make(self, n: int) -> list[Example]:
        """The first `n` kept negatives, in the fixed order of rounds and their questions."""
        kept: list[Example] = []
        seen: set[str] = set()
        for round_ in range(MAX_ROUNDS):
            if len(kept) >= n:
                break
            try:
                result = await self.client.chat(negatives_request(self.settings, self.headings, round_))
            except RequestRejectedError:
                self.counts["negatives dropped: request rejected"] += 1
                break
            fresh = [q for q in parse_negatives(result.content, self.settings) if q.lower() not in seen]
            seen.update(q.lower() for q in fresh)
            if not fresh:
                break  # the model repeats itself: more rounds would only cost
            for question in fresh:
                if len(kept) >= n:
                    break
                candidate = await self.checked(question)
                if candidate is not None:
                    kept.append(negative_example(self.settings, candidate))
        return kept

    async def checked(self, question: str) -> Candidate | None:
        """The question and its retrieval when it stands as a negative; None (counted) when it does not."""
        reason = why_not_a_negative(question, self.positives, self.settings, self.docs_have)
        candidate = None
        if reason is None:
            try:
                candidate = Candidate(question, retrieve(self.retriever, question))
            except VagueQueryError:
                reason = "too vague to search"
        threshold = candidate.retrieval.threshold if candidate is not None else None
        if (
            candidate is not None
            and threshold is not None
            and (candidate.retrieval.relevance or 0.0) >= threshold
        ):
            reason = "retrieval finds a relevant chunk"
        if reason is None and candidate is not None and self.settings.grounding_judge:
            reason = await self._judged(candidate)
        if reason is not None:
            self.counts[f"negatives dropped: {reason}"] += 1
            return None
        return candidate

    async def _judged(self, candidate: Candidate) -> str | None:
        for attempt in range(JUDGE_ATTEMPTS):
            try:
                result = await self.client.chat(judge_request(self.settings, candidate, attempt))
            except RequestRejectedError:
                return "judge request rejected"
            verdict = parse_verdict(result.content)
            if verdict is not None:
                return None if verdict else "the judge finds the docs answer it"
        return "no verdict from the judge"


async def make_negatives(
    store: Store,
    client: LLMClient,
    settings: Settings,
    n_examples: int,
    counts: Counter[str],
    notes: list[str],
) -> list[Example]:
    """negatives_fraction of `n_examples` "I don't know" examples (none, with a note, without an index)."""
    n = wanted(settings, n_examples)
    if n == 0:
        counts.pop(KEPT, None)
        return []
    try:
        maker = NegativeMaker(store, client, settings, counts)
    except RetrievalIndexError as exc:
        notes.append(f"{NO_INDEX} ({exc})")
        return []
    made = await maker.make(n)
    counts[KEPT] = len(made)
    if len(made) < n:
        notes.append(f'only {len(made)} of {n} "I don\'t know" examples passed the checks')
    return made
