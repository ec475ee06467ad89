"""From answers and verdicts to figures: each answer's scores, each arm's estimates, the pairs and the verdict."""

import itertools
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_kit.eval.arms import ArmAnswer, ArmPlan
from finetune_kit.eval.judge import Judgement
from finetune_kit.eval.metrics import (
    FEW_QUESTIONS,
    METRICS,
    Estimate,
    Paired,
    bootstrap,
    citation_precision,
    is_refusal,
    key_term_recall,
    lexical_support,
    paired,
    retrieval_scores,
    token_f1,
)
from finetune_kit.eval.questions import EvalQuestion

Scores = dict[str, float | None]


@dataclass
class ArmSummary:
    """One arm's figures over the questions."""

    name: str
    model: str
    retrieval: bool
    metrics: dict[str, Estimate]
    answers: int
    unjudged: int
    errors: int


@dataclass
class EvalSummary:
    """Everything the report shows; `scores` (per question and arm) go to results.jsonl, not the summary."""

    run: str
    n_questions: int
    origins: dict[str, int]
    arms: list[ArmSummary]
    skipped: dict[str, str]
    pairs: list[Paired]
    primary: str  # the metric arms are ranked and paired on: "correct" when judged, else "token_f1"
    judge_model: str
    notes: list[str] = field(default_factory=list)
    verdict: str = ""
    calls_paid: int = 0
    cache_hits: int = 0
    spent_usd: float = 0.0
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    scores: dict[tuple[str, str], Scores] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary as `--json` prints it and summary.json stores it."""
        data = asdict(self)
        data.pop("scores")
        data["pairs"] = [asdict(p) | {"significant": p.significant} for p in self.pairs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalSummary":
        """A summary read back from summary.json (for --compare)."""
        arms = [
            ArmSummary(**(a | {"metrics": {k: Estimate(**v) for k, v in a["metrics"].items()}}))
            for a in data["arms"]
        ]
        pairs = [Paired(**{k: v for k, v in p.items() if k != "significant"}) for p in data["pairs"]]
        return cls(**(data | {"arms": arms, "pairs": pairs}))

    def arm(self, name: str) -> ArmSummary | None:
        """The arm called `name`, if it ran."""
        return next((a for a in self.arms if a.name == name), None)


def score_answer(question: EvalQuestion, answer: ArmAnswer, judgement: Judgement | None, k: int) -> Scores:
    """Every per-answer score that applies to this question and arm (None: does not apply)."""
    refused = is_refusal(answer.answer) if answer.refused is None else answer.refused
    graded = question.answerable and bool(question.reference) and not answer.error
    reference = question.reference or ""
    scores: Scores = {
        "correct": judgement.score if judgement and graded else None,
        "token_f1": token_f1(answer.answer, reference) if graded else None,
        "key_terms": key_term_recall(answer.answer, reference) if graded else None,
        "refusal_accuracy": None if answer.error else float(refused != question.answerable),
        "latency_p50": answer.latency_ms,
        "latency_p95": answer.latency_ms,
        "cost": answer.cost_usd,
    }
    if answer.grounded:
        scores["faithfulness"] = answer.support.score if answer.support else None  # the judge's claim check
        scores["lexical_support"] = (
            None if refused or answer.error else lexical_support(answer.answer, answer.context)
        )
        scores["citation_precision"] = citation_precision(answer.cited, answer.given, question.gold_paths)
        if question.gold_paths and question.answerable:
            scores |= retrieval_scores(answer.retrieved, question.gold_paths, k)
    return scores


def summarize(
    run: str,
    questions: list[EvalQuestion],
    plan: ArmPlan,
    answers: list[ArmAnswer],
    judgements: dict[tuple[str, str], Judgement],
    context: dict[str, Any],
) -> EvalSummary:
    """Score every answer, estimate every arm's figures with intervals, pair the arms and write the verdict."""
    by_id = {q.id: q for q in questions}
    scores = {
        (a.question_id, a.arm): score_answer(
            by_id[a.question_id], a, judgements.get((a.question_id, a.arm)), int(context.get("k", 4))
        )
        for a in answers
    }
    arms = [
        _arm_summary(arm.name, arm.model, arm.retrieval, answers, scores, judgements) for arm in plan.arms
    ]
    primary = "correct" if any(a.metrics["correct"].n for a in arms) else "token_f1"
    origins: dict[str, int] = {}
    for q in questions:
        origins[q.origin] = origins.get(q.origin, 0) + 1
    summary = EvalSummary(
        run=run,
        n_questions=len(questions),
        origins=origins,
        arms=arms,
        skipped=dict(plan.skipped),
        pairs=_pairs(arms, scores, questions),
        primary=primary,
        judge_model=str(context.get("judge_model") or ""),
        scores=scores,
    )
    summary.notes = _notes(summary, questions, context)
    if unchecked := sum(1 for a in answers if a.support is not None and a.support.unjudged):
        summary.notes.append(
            f"{unchecked} answers' claims unjudged (no claim lines after a retry): left out of 'faithfulness'"
        )
    summary.verdict = verdict_line(summary)
    return summary


def _arm_summary(
    name: str,
    model: str,
    retrieval: bool,
    answers: list[ArmAnswer],
    scores: dict[tuple[str, str], Scores],
    judgements: dict[tuple[str, str], Judgement],
) -> ArmSummary:
    mine = [a for a in answers if a.arm == name]
    figures = {
        metric: bootstrap([scores[(a.question_id, name)].get(metric) for a in mine], metric)
        for metric in METRICS
    }
    unjudged = sum(
        1 for a in mine if (j := judgements.get((a.question_id, name))) and j.verdict == "unjudged"
    )
    return ArmSummary(name, model, retrieval, figures, len(mine), unjudged, sum(1 for a in mine if a.error))


def _pairs(
    arms: list[ArmSummary], scores: dict[tuple[str, str], Scores], questions: list[EvalQuestion]
) -> list[Paired]:
    """Each later arm against each earlier one, on the judge's score and on token F1."""
    found = []
    for earlier, later in itertools.combinations(arms, 2):
        for metric in ("correct", "token_f1"):
            a = {q.id: scores[(q.id, later.name)].get(metric) for q in questions}
            b = {q.id: scores[(q.id, earlier.name)].get(metric) for q in questions}
            found.append(paired(later.name, earlier.name, metric, a, b))
    return found


def _notes(summary: EvalSummary, questions: list[EvalQuestion], context: dict[str, Any]) -> list[str]:
    notes = [f"{name} skipped: {why}" for name, why in summary.skipped.items()]
    notes += [str(note) for note in context.get("notes", [])]
    if summary.n_questions < FEW_QUESTIONS:
        notes.append(
            f"only {summary.n_questions} questions (fewer than {FEW_QUESTIONS}): the intervals are too wide to decide"
        )
    if any(a.retrieval for a in summary.arms):
        notes.append(f"recall@k: k = {context.get('k', 4)}, the chunks each retrieval answer sees")
    if not context.get("judged", True):
        notes.append("no judge (--no-judge): arms are ranked by token F1 against the references")
    if summary.judge_model and summary.judge_model in context.get("arm_models", []):
        notes.append(
            f"the judge ({summary.judge_model}) is also a model under test: it may favour its own answers"
        )
    if unjudged := sum(a.unjudged for a in summary.arms):
        notes.append(
            f"{unjudged} answers unjudged (no verdict after a retry): left out of 'judge correct', not counted as wrong"
        )
    if not any(not q.answerable for q in questions):
        notes.append(
            "no unanswerable questions: refusal accuracy measures only that answerable ones were answered"
            " (add answerable:false lines to --questions, or --unanswerable with an index)"
        )
    return notes


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _interval(estimate: Estimate) -> str:
    if estimate.low is None or estimate.high is None:
        return ""
    return f" ({100 * estimate.low:.0f}–{100 * estimate.high:.0f} %)"


def verdict_line(summary: EvalSummary) -> str:
    """The one-line answer, computed from the figures: each arm's primary score, then the top two arms paired."""
    metric = summary.primary
    ranked = sorted(
        (a for a in summary.arms if a.metrics[metric].value is not None),
        key=lambda a: a.metrics[metric].value or 0.0,
        reverse=True,
    )
    where = _where(summary)
    if not ranked:
        return f"On {where}, no arm could be scored."
    first, *rest = ranked
    how = "answered {} correctly" if metric == "correct" else "scored {} token F1 against the references"
    parts = [
        f"{first.name} {how.format(_pct(first.metrics[metric].value))}{_interval(first.metrics[metric])}"
    ]
    parts += [f"{a.name} {_pct(a.metrics[metric].value)}{_interval(a.metrics[metric])}" for a in rest]
    line = f"On {where}, " + ", ".join(parts)
    if rest:
        line += "; " + _pair_phrase(summary, first.name, rest[0].name, metric)
    return line + "."


_OWN_ORIGINS = ("held-out", "generated unanswerable")  # said as they are; a file's name is "from FILE"


def _where(summary: EvalSummary) -> str:
    n, origins = summary.n_questions, summary.origins
    questions = "question" if n == 1 else "questions"
    if len(origins) == 1:
        (origin,) = origins
        return f"{n} {origin} {questions}" if origin in _OWN_ORIGINS else f"{n} {questions} from {origin}"
    parts = ", ".join(f"{k} {o if o in _OWN_ORIGINS else 'from ' + o}" for o, k in origins.items())
    return f"{n} {questions} ({parts})"


def _pair_phrase(summary: EvalSummary, best: str, second: str, metric: str) -> str:
    pair = next(p for p in summary.pairs if p.metric == metric and {p.a, p.b} == {best, second})
    wins, losses = (pair.wins, pair.losses) if pair.a == best else (pair.losses, pair.wins)
    significance = "significant" if pair.significant else "not significant"
    return f"{best} beats {second} on {wins} questions and loses on {losses} ({significance}, sign test p = {pair.p_value:.2g})"
