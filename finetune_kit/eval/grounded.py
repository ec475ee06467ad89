"""The retrieval arms (rag, ft+rag): the bot's grounded answer — retrieve, the "I don't know" gate, numbered
sources, checked citations — with the one model call sent through the cached client."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from finetune_kit.config import Settings
from finetune_kit.errors import RetrievalIndexError, VagueQueryError
from finetune_kit.eval.arms import ANSWER_TEMPLATE, Arm, ArmAnswer, prompt_budget
from finetune_kit.eval.metrics import citations
from finetune_kit.eval.questions import EvalQuestion
from finetune_kit.llm.client import ChatRequest, ChatResult
from finetune_kit.retrieval.answer import (
    Retrieval,
    checked_answer,
    fit_sources,
    grounded_system_prompt,
    refusal,
    retrieve,
    search_query,
)
from finetune_kit.retrieval.search import Retriever
from finetune_kit.retrieval.types import Hit
from finetune_kit.slack.answerer import Turn, fit_to_context
from finetune_kit.store import Store

RANKED = 10  # hits ranked for recall@k, MRR@10 and nDCG@10


def index_missing(store: Store, settings: Settings) -> str | None:
    """Why the workspace's index cannot serve the retrieval arms (missing, empty, another embedder), or None."""
    try:
        Retriever.open(store, settings)
    except RetrievalIndexError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class GroundedPrompt:
    """What one question retrieved, and the request to send (None: the gate refused, no call is made)."""

    retrieval: Retrieval
    sources: list[Hit]  # the numbered sources the model is given
    ranked: list[Hit]  # the top RANKED hits, for the ranking metrics
    request: ChatRequest | None


def _hit(n: int, hit: Hit) -> dict[str, object]:
    return {"rank": n, "path": hit.path, "url": hit.url, "heading": hit.heading, "score": round(hit.score, 5)}


async def follow_up_query(settings: Settings, question: EvalQuestion) -> str:
    """What the bot searches for: the question, condensed with its history for a follow-up (one cached call,
    made on a thread of its own, as `search_query` runs its own event loop)."""
    if not question.history:
        return question.question
    return await asyncio.to_thread(search_query, settings, question.question, question.history)


class GroundedArm:
    """Prepares and checks the grounded answers of one workspace's index."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.settings = settings
        self.retriever = Retriever.open(store, settings)

    def search(self, query: str) -> tuple[Retrieval, list[Hit]]:
        """What `query` retrieves (the gate's view of it) and its top RANKED hits."""
        try:
            return retrieve(self.retriever, query), self.retriever.search(query, k=RANKED)
        except VagueQueryError:
            return Retrieval(query, [], None, self.retriever.threshold), []

    def prepare(self, question: EvalQuestion, embedded: bool, query: str | None = None) -> GroundedPrompt:
        """Retrieve for `query` (default: the question itself); below the gate no request, else the bot's request."""
        return grounded_prompt(self.settings, question, embedded, *self.search(query or question.question))

    def answer(
        self,
        arm: Arm,
        question: EvalQuestion,
        prompt: GroundedPrompt,
        called: tuple[ChatResult | None, float | None, str | None] | None,
    ) -> ArmAnswer:
        """The arm's answer: the gate's refusal (`called` None), or the model's reply with checked citations."""
        return grounded_answer(self.settings, arm, question, prompt, called)


def grounded_prompt(
    settings: Settings, question: EvalQuestion, embedded: bool, retrieval: Retrieval, ranked: list[Hit]
) -> GroundedPrompt:
    """The bot's request for what was retrieved, or no request when the gate refuses."""
    if not retrieval.relevant:
        return GroundedPrompt(retrieval, [], ranked, None)
    budget = prompt_budget(settings, embedded)
    sources = fit_sources(settings, retrieval.hits, question.question, bool(question.history), budget)
    system = grounded_system_prompt(settings, sources)
    messages = fit_to_context(system, [*question.history, Turn("user", question.question)], budget)
    request = ChatRequest(
        stage="eval-answer",
        messages=tuple((m["role"], m["content"]) for m in messages),
        temperature=settings.slack.temperature,
        max_tokens=settings.slack.max_answer_tokens,
        template_version=ANSWER_TEMPLATE + "+rag",
    )
    return GroundedPrompt(retrieval, sources, ranked, request)


def grounded_answer(
    settings: Settings,
    arm: Arm,
    question: EvalQuestion,
    prompt: GroundedPrompt,
    called: tuple[ChatResult | None, float | None, str | None] | None,
) -> ArmAnswer:
    """The arm's answer: the gate's refusal (`called` None), or the model's reply with checked citations."""
    found = ArmAnswer(question.id, arm.name, arm.model, "", 0.0, True, None)
    found.retrieved = [_hit(n, hit) for n, hit in enumerate(prompt.ranked, 1)]
    found.given = [_hit(n, hit) for n, hit in enumerate(prompt.sources, 1)]
    found.context = [hit.text for hit in prompt.sources]
    if called is None:
        found.answer = refusal(settings, arm.model, prompt.retrieval).answer
        found.refused = found.refused_before_model = True
        return found
    result, found.latency_ms, found.error = called
    if result is None:
        return found
    grounded = checked_answer(settings, arm.model, prompt.retrieval, prompt.sources, result.content)
    found.answer, found.refused = grounded.answer, grounded.refused
    found.cost_usd, found.cached = result.cost_usd, result.cached
    found.cited = citations(result.content)
    found.sources = [asdict(source) for source in grounded.sources]
    return found


class Searcher:
    """The retrieval arms' prompts made on a thread of their own (with its own SQLite connection), once per
    question: rag and ft+rag share each search and its fitted prompt, and searching overlaps the model calls
    instead of stalling the event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-search")
        self._found: dict[tuple[str, bool], asyncio.Future[GroundedPrompt]] = {}
        self._queries: dict[str, asyncio.Future[str]] = {}
        self._store: Store | None = None
        self._arm: GroundedArm | None = None

    async def prompt(self, question: EvalQuestion, embedded: bool) -> GroundedPrompt:
        """The grounded prompt of `question` (a follow-up searches for its condensed query, condensed once)."""
        key = (question.id, embedded)
        if key not in self._found:
            self._found[key] = asyncio.ensure_future(self._prepare(question, embedded))
        return await self._found[key]

    async def _prepare(self, question: EvalQuestion, embedded: bool) -> GroundedPrompt:
        if question.id not in self._queries:  # condensed once, whichever arm asks first
            self._queries[question.id] = asyncio.ensure_future(follow_up_query(self.settings, question))
        query = await self._queries[question.id]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._search, question, embedded, query)

    def _search(self, question: EvalQuestion, embedded: bool, query: str) -> GroundedPrompt:
        if self._arm is None:
            self._store = Store(self.settings.db_path)
            self._arm = GroundedArm(self._store, self.settings)
        return self._arm.prepare(question, embedded, query)

    def close(self) -> None:
        """Close the thread's connection, then the thread."""
        if self._store is not None:
            self._pool.submit(self._store.close).result()
        self._pool.shutdown()
