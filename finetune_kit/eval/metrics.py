"""Scores per answer (judge, token F1, key terms, refusals, retrieval, citations) and per arm, with bootstrap
95 % intervals and paired win/tie/loss tests between arms."""

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from finetune_kit.eval.questions import gold_matches

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240601
SIGNIFICANCE = 0.05
FEW_QUESTIONS = 20  # below this the report says the intervals are too wide to decide
SUPPORTED_SHARE = 0.6  # a claim is supported when this share of its content words is in the retrieved chunks

_WORD = re.compile(r"[a-z0-9][a-z0-9_.\-/]*[a-z0-9]|[a-z0-9]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*[,;]\s*\d{1,3})*)\]")  # [1], [1, 2]
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i do not know|i don'?t know|unfortunately)"
    r"|(documentation|docs|context) (provided )?(does not|doesn'?t) (contain|mention|say|cover|include)"
    r"|not (mentioned|covered|documented) in the (documentation|docs|context)",
    re.IGNORECASE,
)
_STOP_WORDS = (
    "a an the and or but if then of to in on at by for with from as is are was were be been being it its this"
    " that these those there here you your we our they their i me my he she his her them us can could should"
    " would will shall may might must do does did done not no yes so than too very just also only any all"
    " each some such what which who whom whose when where why how into out up down over under about after"
    " before again more most other own same both few have has had having use used using one two"
)
STOP_WORDS = frozenset(_STOP_WORDS.split())

# Each metric: its label in tables, whether higher is better, and how a value is shown.
METRICS: dict[str, tuple[str, bool, str]] = {
    "correct": ("judge correct", True, "pct"),
    "token_f1": ("token F1", True, "pct"),
    "key_terms": ("key-term recall", True, "pct"),
    "refusal_accuracy": ("refusal accuracy", True, "pct"),
    "faithfulness": ("faithfulness", True, "pct"),
    "lexical_support": ("lexical support", True, "pct"),
    "citation_precision": ("citation precision", True, "pct"),
    "recall_at_k": ("recall@k", True, "pct"),
    "mrr": ("MRR@10", True, "num"),
    "ndcg": ("nDCG@10", True, "num"),
    "latency_p50": ("latency p50 ms", False, "ms"),
    "latency_p95": ("latency p95 ms", False, "ms"),
    "cost": ("cost / answer $", False, "usd"),
}


def words(text: str) -> list[str]:
    """Lower-cased word tokens, code names kept whole (`max_retries`, `v2.1`, `/etc/ftkit`)."""
    return _WORD.findall(text.lower())


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1 of the answer against the reference, stop words left out."""
    got = Counter(w for w in words(answer) if w not in STOP_WORDS)
    want = Counter(w for w in words(reference) if w not in STOP_WORDS)
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def key_terms(reference: str) -> set[str]:
    """The reference's key terms: its content words of four letters or more, numbers and code names."""
    return {
        w for w in words(reference) if w not in STOP_WORDS and (len(w) >= 4 or any(c.isdigit() for c in w))
    }


def key_term_recall(answer: str, reference: str) -> float | None:
    """The share of the reference's key terms that the answer uses; None if the reference has none."""
    terms = key_terms(reference)
    if not terms:
        return None
    said = set(words(answer))
    return len(terms & said) / len(terms)


def is_refusal(answer: str) -> bool:
    """True for an answer that declines ("I don't know", "the documentation does not cover it")."""
    return not answer.strip() or bool(_REFUSAL.search(answer))


def citations(answer: str) -> list[int]:
    """The citation numbers `[n]` in an answer, in order of first use."""
    return list(
        dict.fromkeys(int(n) for group in _CITATION.findall(answer) for n in re.findall(r"\d+", group))
    )


def lexical_support(answer: str, context: Sequence[str]) -> float | None:
    """The share of the answer's sentences of 3+ content words whose words the retrieved chunks hold.

    Faithfulness without a judge (the judge's claim check is eval/faithfulness.py): a sentence counts as supported
    when SUPPORTED_SHARE of its content words appear in the chunks the model was given.
    """
    seen = set(words(" ".join(context)))
    claims = [
        content
        for sentence in _SENTENCE.split(_CITATION.sub(" ", answer))
        if len(content := [w for w in words(sentence) if w not in STOP_WORDS]) >= 3
    ]
    if not claims:
        return None
    return sum(sum(w in seen for w in c) / len(c) >= SUPPORTED_SHARE for c in claims) / len(claims)


def citation_precision(
    cited: Sequence[int], retrieved: Sequence[dict[str, object]], gold: tuple[str, ...]
) -> float | None:
    """The share of cited numbers that name a retrieved chunk (and, when gold is known, a gold document)."""
    if not cited:
        return None
    by_rank = {int(str(hit["rank"])): hit for hit in retrieved}
    good = 0
    for n in cited:
        hit = by_rank.get(n)
        if hit is not None and (not gold or gold_matches(gold, str(hit["path"]), str(hit["url"]))):
            good += 1
    return good / len(cited)


def retrieval_scores(
    retrieved: Sequence[dict[str, object]], gold: tuple[str, ...], k: int
) -> dict[str, float]:
    """recall@k (a gold document in the top k), MRR@10 and nDCG@10 with binary relevance per document."""
    relevant = [gold_matches(gold, str(hit["path"]), str(hit["url"])) for hit in retrieved[:10]]
    first = next((i for i, rel in enumerate(relevant) if rel), None)
    docs = {
        (str(h["path"]), str(h["url"]))
        for h in retrieved[:10]
        if gold_matches(gold, str(h["path"]), str(h["url"]))
    }
    seen: set[tuple[str, str]] = set()
    dcg = 0.0
    for i, hit in enumerate(retrieved[:10]):
        doc = (str(hit["path"]), str(hit["url"]))
        if relevant[i] and doc not in seen:  # a second chunk of the same document adds nothing
            seen.add(doc)
            dcg += 1 / math.log2(i + 2)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(max(len(docs), 1), 10)))
    return {
        "recall_at_k": float(any(relevant[:k])),
        "mrr": 0.0 if first is None else 1 / (first + 1),
        "ndcg": dcg / ideal,
    }


@dataclass(frozen=True)
class Estimate:
    """A figure and its bootstrap 95 % interval over the questions it was computed on."""

    value: float | None
    low: float | None
    high: float | None
    n: int


def _statistic(values: np.ndarray, name: str) -> float:
    if name == "latency_p50":
        return float(np.percentile(values, 50))
    if name == "latency_p95":
        return float(np.percentile(values, 95))
    return float(np.mean(values))


def bootstrap(values: Sequence[float | None], name: str, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """The metric over the values present, with a seeded percentile-bootstrap 95 % interval."""
    present = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if present.size == 0:
        return Estimate(None, None, None, 0)
    point = _statistic(present, name)
    rng = np.random.default_rng(seed)
    samples = rng.choice(present, size=(BOOTSTRAP_RESAMPLES, present.size), replace=True)
    if name in ("latency_p50", "latency_p95"):
        stats = np.percentile(samples, 50 if name == "latency_p50" else 95, axis=1)
    else:
        stats = samples.mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Estimate(point, min(float(low), point), max(float(high), point), int(present.size))


@dataclass(frozen=True)
class Paired:
    """Two arms compared question by question on one score."""

    a: str
    b: str
    metric: str
    wins: int  # questions where a scored higher
    ties: int
    losses: int
    p_value: float

    @property
    def significant(self) -> bool:
        """True when the sign test rejects "a and b are as good" at the 5 % level."""
        return self.p_value < SIGNIFICANCE


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins against losses (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(
    a: str, b: str, metric: str, scores_a: dict[str, float | None], scores_b: dict[str, float | None]
) -> Paired:
    """Win/tie/loss of arm a against arm b on the questions both have a score for."""
    both = [
        (scores_a[q], scores_b[q])
        for q in scores_a
        if scores_a[q] is not None and scores_b.get(q) is not None
    ]
    wins = sum(1 for x, y in both if x is not None and y is not None and x > y + 1e-9)
    losses = sum(1 for x, y in both if x is not None and y is not None and y > x + 1e-9)
    return Paired(a, b, metric, wins, len(both) - wins - losses, losses, sign_test(wins, losses))
