"""Answers from the docs: retrieve, refuse below the relevance threshold, answer from numbered sources, check them.

The sources shown are built from the retrieved chunks, never from the model's text. A citation number that no
chunk was given under is dropped from the answer. A link is kept only when it is a retrieved chunk's page or is
written in a retrieved chunk; any other is replaced by "[link removed]": a made-up link is worse than none, and
Slack and terminals make every URL clickable, so leaving it as text would still send people there.
"""

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from finetune_kit.config import Settings
from finetune_kit.errors import RetrievalIndexError
from finetune_kit.prompts import load_prompt
from finetune_kit.retrieval.search import Retriever, relevance
from finetune_kit.retrieval.types import Hit
from finetune_kit.slack.answerer import MESSAGE_OVERHEAD_TOKENS, Answerer, OnText, Turn
from finetune_kit.tokens import count_tokens, truncate_tokens

log = logging.getLogger(__name__)

MIN_SOURCE_TOKENS = 48  # a source cut shorter than this says too little to earn its place
HISTORY_SHARE = 0.2  # of the prompt budget, kept for the earlier turns of a follow-up
MAX_QUERY_SHOWN = 120  # characters of the query a refusal repeats
MAX_CITED_RANGE = 20  # "[1-3]" cites 1, 2 and 3; a wider range is read as its two ends
LINK_REMOVED = "[link removed]"

_BRACKET = r"\[\s*(?:sources?\s*)?(\d{1,3}(?:\s*(?:,|;|-|–|and)\s*\d{1,3})*)\s*\](?!\()"  # [1], [1, 2], [1-3]
_CITATION = re.compile(  # a run of them: "[1][7]", "[1] and [7]"
    rf"(?P<space>[ \t]*)(?<!\w)(?P<run>{_BRACKET}(?:\s*(?:,|;|and|&)?\s*{_BRACKET})*)", re.IGNORECASE
)
_CITED_BRACKET = re.compile(_BRACKET, re.IGNORECASE)
_CITED_NUMBER = re.compile(r"(\d+)(?:\s*[-–]\s*(\d+))?")
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\(\s*([^)\s]*)\s*\)")
_URL = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)[^\s<>()\[\]{}\"'`|\\^]+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?*_~'\""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_DOCS = r"(?:docs|documentation|sources|context|passages|provided (?:text|information))"
# What a model says when the sources do not answer; small models phrase it many ways and then ramble on.
_DOCS_SILENT = re.compile(
    r"\bi (?:do not|don't|dont) know\b"
    rf"|\b{_DOCS}\b[^.!?\n]{{0,60}}?\b(?:do(?:es)?(?:\s+not|n't)|did(?:\s+not|n't)|never)\s+(?:\w+\s+)?"
    r"(?:cover|mention|say|contain|include|provide|address|describe|explain|answer|discuss|specify|state)"
    r"|\b(?:is|are)(?:\s+not|n't)\s+(?:covered|mentioned|described|documented|addressed|specified|explained"
    rf"|included|found)\s+(?:in|by)\s+(?:the|these|any)\s+{_DOCS}"
    rf"|\bno (?:information|mention|details?|answer)\b[^.!?\n]{{0,40}}?\b(?:in|from) (?:the|these|any) {_DOCS}"
    r"|\bi (?:cannot|can't|could not|couldn't|am unable to|was unable to) (?:find|answer|locate|tell)\b"
    r"|\bnot (?:able|possible) to answer\b"
    # the bot's own refusal (refusal_text), which a model trained on with-context examples learns to say
    rf"|\bi found nothing in (?:the|these|any) {_DOCS}\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Source:
    """A retrieved chunk that the answer cites as [n]."""

    n: int
    url: str
    path: str
    heading: str
    score: float
    title: str
    chunk_id: str


@dataclass(frozen=True)
class GroundedAnswer:
    """An answer from the docs and the sources it cites, or a refusal when the docs do not cover the question."""

    answer: str
    model: str
    refused: bool
    query: str  # what was searched for
    sources: list[Source]  # the cited chunks, by number; empty for a refusal
    retrieved: list[Hit]  # what the search returned, in rank order
    cited_nothing: bool  # an answer (not a refusal) that cites no source


@dataclass(frozen=True)
class Retrieval:
    """What one query found, and the scores of the "I don't know" gate."""

    query: str
    hits: list[Hit]
    relevance: float | None  # search.relevance of the hits; None when nothing was found
    threshold: float | None  # None: no threshold known, so no gate
    unknown: tuple[str, ...] = ()  # the query's specific terms that the docs never use (retrieval/terms.py)

    @property
    def relevant(self) -> bool:
        """Something was found, scoring at least the threshold when there is one, and the docs know every term."""
        if not self.hits or self.unknown:
            return False
        return self.threshold is None or (self.relevance is not None and self.relevance >= self.threshold)


def format_context(hits: Sequence[Hit]) -> str:
    """The numbered sources of a grounded prompt: `[n] title — heading`, the URL, then the chunk's text."""
    blocks = []
    for n, hit in enumerate(hits, 1):
        label = f"{hit.title} — {hit.heading}" if hit.heading and hit.heading != hit.title else hit.title
        blocks.append(f"[{n}] {label}\n{hit.url}\n{hit.text.strip()}")
    return "\n\n".join(blocks)


def grounded_system_prompt(settings: Settings, hits: Sequence[Hit]) -> str:
    """The system message of an answer from `hits` (prompts/grounded_answer.txt with format_context)."""
    template = load_prompt("grounded_answer", settings.prompts_dir)
    return template.render(product=settings.product, sources=format_context(hits))


def fit_sources(
    settings: Settings, hits: Sequence[Hit], question: str, follow_up: bool, budget_tokens: int
) -> list[Hit]:
    """The best hits that fit the prompt beside the question, the last one cut to the room left (the first always)."""
    room = budget_tokens - count_tokens(grounded_system_prompt(settings, [])) - 3 * MESSAGE_OVERHEAD_TOKENS
    room -= min(count_tokens(question), budget_tokens // 4)
    if follow_up:
        room -= int(budget_tokens * HISTORY_SHARE)
    fitted: list[Hit] = []
    for hit in hits:
        cost = count_tokens(format_context([hit])) + 2  # and the blank line before the next source
        if cost <= room:
            fitted.append(hit)
            room -= cost
            continue
        header = cost - count_tokens(hit.text)
        if room - header >= MIN_SOURCE_TOKENS or not fitted:
            fitted.append(replace(hit, text=truncate_tokens(hit.text, max(room - header, MIN_SOURCE_TOKENS))))
        break
    return fitted


def check_citations(text: str, hits: Sequence[Hit]) -> tuple[str, set[int]]:
    """The answer without citations of sources it was not given nor foreign links, and the numbers it cites."""
    cited: set[int] = set()

    def citation(match: re.Match[str]) -> str:
        numbers = [n for spec in _CITED_BRACKET.findall(match["run"]) for n in _cited_numbers(spec)]
        kept = [n for n in dict.fromkeys(numbers) if 1 <= n <= len(hits)]
        cited.update(kept)
        if len(kept) == len(numbers):
            return match[0]
        return f"{match['space']}[{', '.join(map(str, kept))}]" if kept else ""

    pages = {_page(hit.url): n for n, hit in reversed(list(enumerate(hits, 1)))}
    quoted = {_trimmed(url)[0] for hit in hits for url in _URL.findall(hit.text)}

    def markdown_link(match: re.Match[str]) -> str:
        url = match[2]
        if url and _page(url) in pages:
            cited.add(pages[_page(url)])
            return match[0]
        return match[0] if url in quoted else match[1]

    def bare_url(match: re.Match[str]) -> str:
        url, trailing = _trimmed(match[0])
        if _page(url) in pages:
            cited.add(pages[_page(url)])
        elif url not in quoted:
            url = LINK_REMOVED
        return url + trailing

    text = _CITATION.sub(citation, text)
    text = _MD_LINK.sub(markdown_link, text)
    return _URL.sub(bare_url, text), cited


def _cited_numbers(spec: str) -> list[int]:
    """The numbers of `1, 2`, `1-3`, `1 and 4`, in order, each once."""
    numbers: list[int] = []
    for low, high in _CITED_NUMBER.findall(spec):
        start, end = int(low), int(high or low)
        span = range(start, end + 1) if 0 <= end - start <= MAX_CITED_RANGE else (start, end)
        numbers.extend(n for n in span if n not in numbers)
    return numbers


def _page(url: str) -> str:
    """A URL without its #fragment or trailing slash: a link to a chunk's page is a link to the chunk."""
    return url.split("#", 1)[0].rstrip("/")


def _trimmed(url: str) -> tuple[str, str]:
    """A URL found in prose, and the punctuation after it that belongs to the sentence."""
    stripped = url.rstrip(_URL_TRAILING)
    return stripped, url[len(stripped) :]


def says_docs_silent(text: str, cited: set[int]) -> bool:
    """True when the model says the sources do not answer: in its first sentence, or anywhere with nothing cited."""
    plain = text.replace("\u2019", "'").strip().lstrip("#>*_ -")
    opening = next((part for part in _SENTENCE_END.split(plain) if part.strip()), "")
    return bool(_DOCS_SILENT.search(opening)) or (not cited and bool(_DOCS_SILENT.search(plain)))


def refusal_text(settings: Settings, query: str, unknown: Sequence[str] = ()) -> str:
    """The one sentence of "I don't know": what was searched for (or what the docs never mention), what to try."""
    ask = f"ask a person: {settings.support_contact}" if settings.support_contact else "ask a person"
    if unknown:
        named = ", ".join(f"“{term}”" for term in unknown[:3])
        return (
            f"The documentation of {settings.product} never mentions {named}, so I won't guess"
            f" — if it goes by another name there, ask with that word, or {ask}."
        )
    shown = " ".join(query.split())
    if len(shown) > MAX_QUERY_SHOWN:
        shown = shown[: MAX_QUERY_SHOWN - 1].rstrip() + "…"
    return (
        f"I found nothing in the documentation of {settings.product} that answers “{shown}”, so I won't guess"
        f" — try the words the docs would use, or {ask}."
    )


def refusal(settings: Settings, model: str, retrieval: Retrieval) -> GroundedAnswer:
    """The refusal for a question the docs do not cover: no sources, nothing made up."""
    text = refusal_text(settings, retrieval.query, retrieval.unknown)
    return GroundedAnswer(text, model, True, retrieval.query, [], retrieval.hits, False)


def search_query(settings: Settings, question: str, history: Sequence[Turn]) -> str:
    """What to search for: the question, condensed with the thread's history when it is a follow-up."""
    from finetune_kit.retrieval.followup import standalone_question

    return standalone_question(settings, history, question)


def retrieve(retriever: Retriever, query: str) -> Retrieval:
    """Search for `query` and score the hits for the gate (no threshold known: no gate, and it says so)."""
    hits = retriever.search(query)
    threshold = retriever.threshold
    if threshold is None:
        log.info("no relevance threshold: set retrieval.threshold or run `ftkit index --calibrate`")
    unknown = tuple(retriever.unknown_terms(query))
    if unknown:
        log.info("the docs never mention %s: refusing %r", ", ".join(unknown), query)
    return Retrieval(query, hits, relevance(hits) if hits else None, threshold, unknown)


def answer_from_retrieval(
    settings: Settings,
    answerer: Answerer,
    retrieval: Retrieval,
    question: str,
    history: Sequence[Turn] = (),
    on_text: OnText | None = None,
) -> GroundedAnswer:
    """The refusal below the gate (no model call), else the model's answer from the sources, checked."""
    if not retrieval.relevant:
        return refusal(settings, answerer.model, retrieval)
    hits = fit_sources(settings, retrieval.hits, question, bool(history), answerer.prompt_budget)
    system = grounded_system_prompt(settings, hits)

    def shown(text: str) -> None:
        if on_text is not None:  # the preview is checked like the answer: no foreign link even for a second
            on_text(check_citations(text, hits)[0])

    raw = answerer.answer([*history, Turn("user", question)], shown, system=system)
    return checked_answer(settings, answerer.model, retrieval, hits, raw)


def checked_answer(
    settings: Settings, model: str, retrieval: Retrieval, hits: Sequence[Hit], raw: str
) -> GroundedAnswer:
    """The model's answer with checked citations and sources from `hits`; a refusal when it says it cannot tell."""
    text, cited = check_citations(raw, hits)
    if says_docs_silent(text, cited):
        log.info("the model says the docs do not answer %r", retrieval.query)
        return refusal(settings, model, retrieval)
    sources = [_source(n, hits[n - 1]) for n in sorted(cited)]
    return GroundedAnswer(text.strip(), model, False, retrieval.query, sources, retrieval.hits, not sources)


def _source(n: int, hit: Hit) -> Source:
    return Source(n, hit.url, hit.path, hit.heading, hit.score, hit.title, hit.chunk_id)


@contextlib.contextmanager
def open_retriever(settings: Settings) -> Iterator[Retriever]:
    """The workspace's retriever, on its state database (which it does not create)."""
    from finetune_kit.store import Store

    if not settings.db_path.exists():
        raise RetrievalIndexError(
            f"{settings.workspace} has no index yet — run `ftkit index` (after `ftkit ingest`)"
        )
    with Store(settings.db_path) as store:
        yield Retriever.open(store, settings)


def answer_with_sources(
    settings: Settings,
    question: str,
    history: Sequence[Turn] = (),
    model: str | None = None,
    on_text: OnText | None = None,
) -> GroundedAnswer:
    """Retrieve, refuse below the threshold without calling (or starting) a model, else answer from the sources.

    `model` defaults to the bot's model (the newest fine-tuned one, else the base model).
    """
    from finetune_kit.llm.endpoint import open_model_endpoint
    from finetune_kit.slack.answerer import OpenAIAnswerer, bot_model

    name = model or bot_model(settings)
    query = search_query(settings, question, history)
    with open_retriever(settings) as retriever:
        retrieval = retrieve(retriever, query)
    if not retrieval.relevant:
        return refusal(settings, name, retrieval)
    with open_model_endpoint(settings, name) as endpoint:
        answerer = OpenAIAnswerer.from_settings(endpoint, settings)
        try:
            return answer_from_retrieval(settings, answerer, retrieval, question, history, on_text)
        finally:
            answerer.close()


class GroundedAnswerer:
    """Answers from the docs for a long-running bot: one retriever on its own thread, the bot's answerer.

    The retriever's SQLite connection belongs to the thread that opened it, and a search takes milliseconds, so
    every search runs on one thread while the answers are written on the bot's many.
    """

    def __init__(self, settings: Settings, answerer: Answerer) -> None:
        self.settings, self.answerer = settings, answerer
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ftkit-retrieval")
        self._opened = contextlib.ExitStack()
        try:
            self._retriever = self._worker.submit(
                self._opened.enter_context, open_retriever(settings)
            ).result()
        except BaseException:
            self._worker.shutdown()
            raise

    def answer_from_docs(
        self, question: str, history: Sequence[Turn], on_text: OnText | None = None
    ) -> GroundedAnswer:
        """The checked answer to `question`, after the thread's `history`."""
        query = search_query(self.settings, question, history)
        retrieval = self._worker.submit(retrieve, self._retriever, query).result()
        return answer_from_retrieval(self.settings, self.answerer, retrieval, question, history, on_text)

    def close(self) -> None:
        """Close the retriever's database on the thread that opened it."""
        self._worker.submit(self._opened.close).result()
        self._worker.shutdown()


@contextlib.contextmanager
def grounded_answerer(settings: Settings, answerer: Answerer) -> Iterator[GroundedAnswerer]:
    """A GroundedAnswerer over `answerer`, closed at the end of the context."""
    grounded = GroundedAnswerer(settings, answerer)
    try:
        yield grounded
    finally:
        grounded.close()


def docs_for_bot(
    settings: Settings, rag: bool | None
) -> Callable[[Answerer], contextlib.AbstractContextManager[GroundedAnswerer]] | None:
    """How `ftkit slack` opens its docs answerer, or None to answer from the model alone.

    `rag` None means the retrieval.rag setting; an index that is missing or stale is then a warning, while an
    explicit `rag` makes it the error, before any model server starts.
    """
    if not (rag if rag is not None else settings.retrieval.rag):
        return None
    try:
        with open_retriever(settings):
            pass
    except RetrievalIndexError as exc:
        if rag:
            raise
        log.warning("answering without retrieval: %s", exc)
        return None
    return functools.partial(grounded_answerer, settings)
