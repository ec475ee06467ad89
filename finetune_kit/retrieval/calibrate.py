"""The "I don't know" threshold, measured per workspace: the relevance that best separates what the docs answer.

Positives are the workspace's own accepted generated questions (each was written from an active chunk).
Negatives are questions the docs cannot answer: a fixed list of off-topic ones (weather, cooking, other
software), so that calibration works even when generation is poor, and plausible support questions about
features the docs do not describe, written by the model (one cached call) and then checked against the index.
Every question is scored with `relevance(retriever.search(q))`; a question is refused when its relevance is
below the threshold, and the threshold kept is the one with the best balanced accuracy.
"""

import asyncio
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from typing import TYPE_CHECKING, Any, Protocol

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError, LLMError, VagueQueryError
from finetune_kit.llm.client import ChatRequest
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.prompts import load_prompt
from finetune_kit.retrieval.terms import DocsHave, docs_vocabulary, key_terms
from finetune_kit.retrieval.types import Hit
from finetune_kit.store import Store, utc_now
from finetune_kit.workspace_lock import writer_lock

if TYPE_CHECKING:
    from finetune_kit.llm.client import LLMClient
    from finetune_kit.retrieval.index import EmbedderFactory

log = logging.getLogger(__name__)

STAGE = "calibrate-negatives"
MIN_POSITIVES = 10
MIN_NEGATIVES = 10
MAX_POSITIVES = 300  # a sample is enough to place a threshold; scoring every question of a big corpus is not
GENERATED_NEGATIVES = 20  # asked of the model in one call
MAX_HEADINGS = 15  # section headings the model is shown, spread over the documents
NEGATIVES_MAX_TOKENS = 600
MIN_WORDS, MAX_WORDS = 3, 40  # a generated question's length
_LIST_ITEM = re.compile(r"^\s*(?:\d{1,2}\s*[.):]|[-*•+])\s*(.+?)\s*$")
_QUOTES = re.compile(r"^[\s\"'“”*_`]+|[\s\"'“”*_`]+$")

# Questions no product's docs answer: they keep calibration working when the model writes no usable negative.
OFF_TOPIC = (
    "What will the weather be like in Paris tomorrow?",
    "Will it rain in London this weekend?",
    "How long should I boil an egg for a soft yolk?",
    "What is a good recipe for banana bread?",
    "How do I make a risotto without it turning sticky?",
    "Which wine goes well with grilled salmon?",
    "Who won the football World Cup in 2018?",
    "How many players are on a basketball team?",
    "What is the longest river in Africa?",
    "How tall is Mount Everest?",
    "How do I make a pivot table in Microsoft Excel?",
    "How do I remove the background of a photo in Photoshop?",
    "How do I change my wallpaper on an iPhone?",
    "How do I pause Windows updates on my laptop?",
    "How do I export my contacts from Outlook to Gmail?",
    "What is the keyboard shortcut to undo in Google Docs?",
    "How do I cancel my Netflix subscription?",
    "How do I train for a marathon in three months?",
    "What are the symptoms of a common cold?",
    "How often should I water a cactus?",
    "How do I get rid of aphids on my roses?",
    "What is the best time of year to visit Japan?",
    "How do I change a flat tyre on a bicycle?",
    "Can you recommend a good science fiction novel?",
)


class Searcher(Protocol):
    """What calibration needs of retrieval.search.Retriever."""

    def search(self, query: str, k: int | None = None, mmr: bool | None = None) -> list[Hit]:
        """The ranked hits for `query`."""
        ...


@dataclass(frozen=True)
class Labelled:
    """A calibration question and, for a positive, the chunk it was written from."""

    text: str
    chunk_id: str | None = None


@dataclass
class Calibration:
    """What `calibrate` measured, and the threshold it stored (None: too few questions, the gate stays off)."""

    threshold: float | None = None
    balanced_accuracy: float | None = None
    answerable_refused: float | None = None  # share of positives whose relevance is below the threshold
    unanswerable_refused: float | None = None  # share of negatives whose relevance is below the threshold
    n_answerable_refused: int = 0
    n_unanswerable_refused: int = 0
    n_positives: int = 0
    n_negatives: int = 0
    n_off_topic: int = 0  # of the negatives, from the built-in list
    n_generated: int = 0  # negatives the model wrote that parsed as questions
    n_generated_kept: int = 0  # of those, the ones that passed the check against the index
    own_chunk_found: int = 0  # positives whose source chunk was among their hits
    dropped: dict[str, int] = field(default_factory=dict)  # why negatives were set aside, and how many
    generation_error: str | None = None  # why the model wrote no negatives, when it failed
    reason: str | None = None  # why no threshold was stored

    def line(self) -> str:
        """What the calibration found, in one line for the terminal."""
        if self.threshold is None:
            return f'"I don\'t know" threshold not calibrated: {self.reason}'
        return (
            f'"I don\'t know" threshold {self.threshold:.3f} (balanced accuracy {self.balanced_accuracy:.2f}):'
            f" answerable refused {self.answerable_refused:.0%} ({self.n_answerable_refused}/{self.n_positives}),"
            f" unanswerable refused {self.unanswerable_refused:.0%}"
            f" ({self.n_unanswerable_refused}/{self.n_negatives}: {self.n_off_topic} off-topic,"
            f" {self.n_generated_kept} of {self.n_generated} generated kept)"
        )

    def stats(self) -> dict[str, Any]:
        """What is stored beside the threshold (index_state's calibration stats)."""
        return {key: value for key, value in asdict(self).items() if key != "threshold"} | {
            "calibrated_at": utc_now()
        }


def calibrate(
    store: Store,
    settings: Settings,
    on_progress: Progress | None = None,
    open_embedder: "EmbedderFactory | None" = None,
) -> Calibration:
    """Measure the workspace's threshold and store it with the index (nothing with too few questions)."""
    from finetune_kit.retrieval.search import Retriever

    if (n_positives := len(positive_questions(store))) < MIN_POSITIVES:
        return _too_few_positives(n_positives)  # before loading an embedder or starting a model
    return calibrate_with(store, settings, Retriever.open(store, settings, open_embedder), on_progress)


def calibrate_workspace(
    settings: Settings, on_progress: Progress | None = None, only_if_uncalibrated: bool = False
) -> Calibration | None:
    """`ftkit index --calibrate` (and, uncalibrated, after `ftkit index`): calibrate as the workspace's writer.

    With `only_if_uncalibrated`, nothing is done (None) once a threshold is stored or set.
    """
    with writer_lock(settings.workspace, "index --calibrate"), Store(settings.db_path) as store:
        if only_if_uncalibrated and not uncalibrated(store, settings):
            return None
        return calibrate(store, settings, on_progress)


def uncalibrated(store: Store, settings: Settings) -> bool:
    """True when neither the setting nor the index holds a threshold."""
    from finetune_kit.retrieval.index import index_state

    state = index_state(store)
    return settings.retrieval.threshold is None and (state is None or state.threshold is None)


def calibrate_with(
    store: Store, settings: Settings, retriever: Searcher, on_progress: Progress | None = None
) -> Calibration:
    """`calibrate` through a given retriever."""
    from finetune_kit.retrieval.index import set_threshold

    report = Calibration()
    positives = positive_questions(store)
    if len(positives) < MIN_POSITIVES:
        return _too_few_positives(len(positives))
    generated = _generated_negatives(store, settings, report)
    kept, report.dropped = checked_negatives(store, settings, generated, [p.text for p in positives])
    progress = on_progress or NoProgress()
    progress.start("calibrate", len(positives) + len(OFF_TOPIC) + len(kept))
    try:
        scored = _Scorer(retriever, progress)
        positive_scores = scored.positives(positives, report)
        negative_scores = scored.negatives([*OFF_TOPIC, *kept], report)
    finally:
        progress.finish()
    report.n_positives, report.n_negatives = len(positive_scores), len(negative_scores)
    if report.n_negatives < MIN_NEGATIVES or report.n_positives < MIN_POSITIVES:
        report.reason = (
            f"only {report.n_positives} answerable and {report.n_negatives} unanswerable questions could be"
            f" scored (calibration needs {MIN_POSITIVES} and {MIN_NEGATIVES})"
        )
        return report
    choice = best_threshold(positive_scores, negative_scores)
    report.threshold, report.balanced_accuracy = choice.threshold, choice.balanced_accuracy
    report.answerable_refused, report.unanswerable_refused = (
        choice.positives_refused,
        choice.negatives_refused,
    )
    report.n_answerable_refused = sum(score < choice.threshold for score in positive_scores)
    report.n_unanswerable_refused = sum(score < choice.threshold for score in negative_scores)
    set_threshold(store, choice.threshold, report.stats())
    log.info("calibrated threshold %.4f: %s", choice.threshold, json.dumps(report.stats()))
    return report


def _too_few_positives(n: int) -> Calibration:
    reason = (
        f"only {n} generated questions (calibration needs {MIN_POSITIVES})"
        " — run `ftkit generate-questions`, then `ftkit index --calibrate`"
    )
    return Calibration(n_positives=n, reason=reason)


def positive_questions(store: Store, limit: int = MAX_POSITIVES) -> list[Labelled]:
    """A fixed sample of the accepted generated questions whose chunk is active (ids are hashes: no bias)."""
    rows = store.db.execute(
        "SELECT q.text, min(q.chunk_id) AS chunk_id FROM questions q JOIN chunks c ON c.id = q.chunk_id"
        " WHERE q.status = 'accepted' AND c.status = 'active' GROUP BY q.text ORDER BY min(q.id) LIMIT ?",
        (limit,),
    ).fetchall()
    return [Labelled(row["text"], row["chunk_id"]) for row in rows]


def section_headings(store: Store, limit: int = MAX_HEADINGS) -> list[str]:
    """Distinct section headings of the active chunks, taken in turn from each document."""
    rows = store.db.execute(
        "SELECT document_id, heading_path FROM chunks WHERE status = 'active' ORDER BY document_id, seq"
    ).fetchall()
    by_document: dict[str, list[str]] = {}
    for row in rows:
        heading = " > ".join(json.loads(row["heading_path"]))
        headings = by_document.setdefault(row["document_id"], [])
        if heading and heading not in headings:
            headings.append(heading)
    spread = [h for round_ in _interleave(list(by_document.values())) for h in round_]
    return list(dict.fromkeys(spread))[:limit]


def negatives_request(
    settings: Settings,
    headings: Sequence[str],
    *,
    prompt: str = "unanswerable",
    stage: str = STAGE,
    attempt: int = 0,
) -> ChatRequest:
    """The request that asks for questions the docs cannot answer (its hash is the cache key); the dataset's
    "I don't know" examples ask with their own prompt and stage, one attempt per round."""
    template = load_prompt(prompt, settings.prompts_dir)
    text = template.render(
        product=settings.product,
        n=GENERATED_NEGATIVES,
        headings="\n".join(f"- {heading}" for heading in headings),
    )
    return ChatRequest(
        stage=stage,
        messages=(("user", text),),
        temperature=settings.question_temperature,
        max_tokens=NEGATIVES_MAX_TOKENS,
        template_version=template.version,
        attempt=attempt,
    )


def parse_negatives(output: str, settings: Settings) -> list[str]:
    """The distinct questions of the model's list (its first item may lack the "1." the prompt ended with)."""
    kept: list[str] = []
    for n, line in enumerate(output.splitlines()):
        item = _LIST_ITEM.match(line)
        text = _QUOTES.sub("", item.group(1) if item else line if n == 0 else "")
        words = len(text.split())
        if not text.endswith("?") or text.count("?") > 1 or not MIN_WORDS <= words <= MAX_WORDS:
            continue  # prose around the list, a fragment cut off by max_tokens, a rambling paragraph
        if not any(_alike(text, other, settings.near_duplicate_threshold) for other in kept):
            kept.append(text)
    return kept[:GENERATED_NEGATIVES]


def _alike(a: str, b: str, threshold: float) -> bool:
    return SequenceMatcher(None, _normalised(a), _normalised(b), autojunk=False).ratio() >= threshold


def why_not_a_negative(
    question: str, positives: Sequence[str], settings: Settings, docs_have: DocsHave
) -> str | None:
    """Why a generated negative may be answerable after all, or None when it may stand.

    Dropped: a near duplicate of a workspace question (normalised texts at least near_duplicate_threshold
    alike), a question with no key terms (its content words, less the product's name and the words every
    support question has), and one whose key terms all occur in the docs: a question is kept as unanswerable
    only when it names something the docs never mention (Salesforce, SAML, an Android app).
    """
    norm = _normalised(question)
    if any(
        SequenceMatcher(None, norm, _normalised(p), autojunk=False).ratio()
        >= settings.near_duplicate_threshold
        for p in positives
    ):
        return "near duplicate of a workspace question"
    terms = key_terms(question, settings.product)
    if not terms:
        return "no key terms"
    if all(docs_have(term) for term in terms):
        return "the docs use every key term"
    return None


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and how it splits the scores."""

    threshold: float
    balanced_accuracy: float
    positives_refused: float
    negatives_refused: float


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> ThresholdChoice:
    """The threshold (refuse below it) with the best balanced accuracy; ties go to the widest gap's midpoint."""
    scores = sorted(set(positives) | set(negatives))
    candidates = [(scores[0] - 1e-6, 0.0)]
    candidates += [((low + high) / 2, high - low) for low, high in itertools.pairwise(scores)]
    candidates.append((scores[-1] + 1e-6, 0.0))
    best: tuple[float, float, ThresholdChoice] | None = None
    for threshold, gap in candidates:
        choice = _split(threshold, positives, negatives)
        if best is None or (choice.balanced_accuracy, gap) > best[:2]:
            best = (choice.balanced_accuracy, gap, choice)
    assert best is not None
    return best[2]


def _split(threshold: float, positives: Sequence[float], negatives: Sequence[float]) -> ThresholdChoice:
    positives_refused = sum(score < threshold for score in positives) / len(positives)
    negatives_refused = sum(score < threshold for score in negatives) / len(negatives)
    return ThresholdChoice(
        threshold=threshold,
        balanced_accuracy=((1 - positives_refused) + negatives_refused) / 2,
        positives_refused=positives_refused,
        negatives_refused=negatives_refused,
    )


@dataclass
class _Scorer:
    """Scores calibration questions with the relevance the gate compares, reporting progress."""

    retriever: Searcher
    progress: Progress

    def score(self, question: str) -> tuple[list[Hit], float | None]:
        """The hits and relevance of one question; None for a query too vague to search (refused anyway)."""
        from finetune_kit.retrieval.search import relevance

        try:
            hits = self.retriever.search(question)
        except VagueQueryError:
            hits = None
        self.progress.advance()
        return (hits or [], relevance(hits) if hits is not None else None)

    def positives(self, questions: Sequence[Labelled], report: Calibration) -> list[float]:
        """The relevance of each answerable question."""
        scores = []
        for question in questions:
            hits, score = self.score(question.text)
            report.own_chunk_found += any(hit.chunk_id == question.chunk_id for hit in hits)
            if score is not None:
                scores.append(score)
        return scores

    def negatives(self, questions: Sequence[str], report: Calibration) -> list[float]:
        """The relevance of each unanswerable question (built-in, or generated and checked)."""
        scores = []
        for question in questions:
            score = self.score(question)[1]
            if score is None:
                report.dropped["too vague to search"] = report.dropped.get("too vague to search", 0) + 1
                continue
            built_in = question in OFF_TOPIC
            report.n_off_topic += built_in
            report.n_generated_kept += not built_in
            scores.append(score)
        return scores


def checked_negatives(
    store: Store, settings: Settings, generated: Sequence[str], positives: Sequence[str]
) -> tuple[list[str], dict[str, int]]:
    """The generated questions that may stand as unanswerable (checked against the index's words and the
    workspace's questions by `why_not_a_negative`), and why the others were dropped, with how many."""
    docs_have = docs_vocabulary(store)
    kept: list[str] = []
    dropped: Counter[str] = Counter()
    for question in generated:
        reason = why_not_a_negative(question, positives, settings, docs_have)
        if reason is None:
            kept.append(question)
        else:
            dropped[reason] += 1
    return kept, dict(dropped)


def _generated_negatives(store: Store, settings: Settings, report: Calibration) -> list[str]:
    """The model's questions about what the docs do not describe; none (with the reason) when it fails."""
    try:
        generated = asyncio.run(_ask_for_negatives(store, settings, section_headings(store)))
    except (LLMError, ConfigError) as exc:
        log.warning(
            "no generated negatives for calibration (%s); using the built-in off-topic questions", exc
        )
        report.generation_error = str(exc)
        return []
    report.n_generated = len(generated)
    return [question for question in generated if question not in OFF_TOPIC]


async def _ask_for_negatives(store: Store, settings: Settings, headings: list[str]) -> list[str]:
    from finetune_kit.llm.endpoint import one_call_client

    async with one_call_client(store, settings) as client:
        return await ask_for_negatives(client, settings, headings)


async def ask_for_negatives(client: "LLMClient", settings: Settings, headings: Sequence[str]) -> list[str]:
    """The questions the model writes about what `headings` do not describe (one cached call), parsed."""
    result = await client.chat(negatives_request(settings, headings))
    return parse_negatives(result.content, settings)


def _interleave(lists: list[list[str]]) -> list[list[str]]:
    """[[a1, b1], [a2, b2], …]: the first item of each list, then the second of each…"""
    rounds: list[list[str]] = []
    for items in lists:
        for i, item in enumerate(items):
            if i == len(rounds):
                rounds.append([])
            rounds[i].append(item)
    return rounds


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower()).strip()
