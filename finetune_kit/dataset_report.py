"""The dataset report: `<dataset>/report.html` (self-contained, charts as inline SVG) and report.json for status.

The charts are drawn as SVG by hand rather than with matplotlib: generating a dataset never imports it (a base
install stays light and fast; tests/test_extras.py checks that it is not even looked up).

Counts per gate (accepted, rejected and why), negatives and paraphrases, question and answer lengths, the coverage
ledger per source (chunks with and without examples) and 20 seeded random examples to read.
"""

import html
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.disk_space import written_whole
from finetune_kit.prompts import load_prompt
from finetune_kit.stages.build_dataset import CHUNK_ANSWER_KEY, DatasetReport, answer_keys
from finetune_kit.stages.dataset import Example, held_out_chunks
from finetune_kit.stages.generate_questions import generation_key
from finetune_kit.stages.grounding import REASON_CATEGORY
from finetune_kit.store import Store

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SAMPLES = 20
CHART_WIDTH, CHART_HEIGHT = 640, 200


@dataclass
class SourceCoverage:
    """One source's active chunks, and how many of them gave the dataset an example."""

    spec: str
    chunks: int
    with_examples: int

    @property
    def without_examples(self) -> int:
        """Chunks of the source with no example in the dataset."""
        return self.chunks - self.with_examples


@dataclass
class DatasetSummary:
    """What the written dataset holds and what its gates let through."""

    answers: dict[str, int] = field(default_factory=dict)  # "accepted" or the reject's category -> count
    train: int = 0
    validation: int = 0
    paraphrases: int = 0
    negatives: int = 0  # "I don't know" examples, train and validation
    question_words: list[int] = field(default_factory=list)
    answer_words: list[int] = field(default_factory=list)
    sources: list[SourceCoverage] = field(default_factory=list)
    uncovered: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # path, heading, why no example (first 100)
    samples: list[dict[str, str]] = field(default_factory=list)

    def status_lines(self) -> list[tuple[str, str]]:
        """The summary rows `ftkit status` shows."""
        chunks = sum(s.chunks for s in self.sources)
        covered = sum(s.with_examples for s in self.sources)
        return [
            ("dataset (train / validation)", f"{self.train} / {self.validation}"),
            ("dataset paraphrases / negatives", f"{self.paraphrases} / {self.negatives}"),
            ("chunks with examples", f"{covered} of {chunks}"),
        ]


def summarise_dataset(
    store: Store, settings: Settings, identity: str, model: str, examples: list[Example]
) -> DatasetSummary:
    """Read the gates' counts from the answers ledger and describe `examples` as write_dataset splits them."""
    held_out = held_out_chunks(examples, settings.validation_fraction, settings.split_seed)
    summary = DatasetSummary(
        answers=_answer_outcomes(store, answer_keys(settings, identity, model)),
        train=sum(e.chunk_id not in held_out for e in examples),
        validation=sum(e.chunk_id in held_out and not e.paraphrase for e in examples),
        paraphrases=sum(e.paraphrase and e.chunk_id not in held_out for e in examples),
        negatives=sum(e.negative for e in examples),
        question_words=[len(e.question.split()) for e in examples],
        answer_words=[len(e.answer.split()) for e in examples if not e.paraphrase],
        sources=_coverage(store, {e.chunk_id for e in examples}),
        uncovered=_uncovered(store, settings, identity, model, {e.chunk_id for e in examples}),
    )
    picked = random.Random(settings.split_seed).sample(examples, min(SAMPLES, len(examples)))
    summary.samples = [_sample(e, held_out) for e in picked]
    return summary


def _sample(example: Example, held_out: set[str]) -> dict[str, str]:
    split = "validation" if example.chunk_id in held_out else "train"
    kind = "paraphrase" if example.paraphrase else "I don't know" if example.negative else "question"
    return {"split": split, "kind": kind, "question": example.question, "answer": example.answer}


def _answer_outcomes(store: Store, keys: dict[str, str]) -> dict[str, int]:
    rows = store.db.execute(
        f"SELECT coalesce({REASON_CATEGORY}, 'accepted'), count(*) FROM answers a"
        " JOIN questions q ON q.id = a.question_id JOIN chunks c ON c.id = q.chunk_id"
        " JOIN documents d ON d.id = c.document_id"
        f" WHERE c.status = 'active' AND a.answer_key = {CHUNK_ANSWER_KEY} GROUP BY 1 ORDER BY 2 DESC",
        keys,
    )
    return {str(row[0]): int(row[1]) for row in rows}


def _coverage(store: Store, with_examples: set[str]) -> list[SourceCoverage]:
    per_source: dict[str, SourceCoverage] = {}
    rows = store.db.execute(
        "SELECT s.spec, c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
        " JOIN sources s ON s.id = d.source_id WHERE c.status = 'active' ORDER BY s.spec"
    )
    for spec, chunk_id in rows:
        source = per_source.setdefault(spec, SourceCoverage(spec, 0, 0))
        source.chunks += 1
        source.with_examples += chunk_id in with_examples
    return list(per_source.values())


def report_dataset(
    store: Store,
    settings: Settings,
    identity: str,
    model: str,
    examples: list[Example],
    report: DatasetReport,
) -> Path:
    """Summarise the dataset build-dataset just wrote and write its report beside it."""
    summary = summarise_dataset(store, settings, identity, model, examples)
    return write_dataset_report(settings.dataset_path, summary, report)


def _uncovered(
    store: Store, settings: Settings, identity: str, model: str, with_examples: set[str]
) -> list[tuple[str, str, str]]:
    """Chunks without an example and why: the coverage ledger's reason, else what happened to their answers."""
    q_key = generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)
    rows = store.db.execute(
        "SELECT c.id, d.path, c.heading_path, s.reason, s.n_accepted FROM chunks c"
        " JOIN documents d ON d.id = c.document_id"
        " LEFT JOIN question_sets s ON s.chunk_id = c.id AND s.generation_key = ?"
        " WHERE c.status = 'active' ORDER BY d.path, c.seq",
        (q_key,),
    )
    found = []
    for chunk_id, path, heading, reason, n_accepted in rows:
        if chunk_id in with_examples:
            continue
        why = reason or (
            "no question yet" if n_accepted is None else "every answer rejected (see the answers)"
        )
        found.append((path, " > ".join(json.loads(heading)), why))
    return found[:100]


def write_dataset_report(out_dir: Path, summary: DatasetSummary, report: DatasetReport) -> Path:
    """Write report.html and report.json into `out_dir` (each to a temporary name, then renamed)."""
    data = asdict(summary) | {"run": {"grounding": dict(report.grounding), "curation": dict(report.curation)}}
    with written_whole(out_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    page = render_html(summary, report)
    with written_whole(out_dir / REPORT_HTML) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_dir / REPORT_HTML


def read_dataset_summary(out_dir: Path) -> DatasetSummary | None:
    """The summary the last build-dataset wrote to `out_dir`, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((out_dir / REPORT_JSON).read_text(encoding="utf-8"))
        data.pop("run", None)
        data["sources"] = [SourceCoverage(**s) for s in data.get("sources", [])]
        data["uncovered"] = [tuple(row) for row in data.get("uncovered", [])]
        return DatasetSummary(**data)
    except (OSError, ValueError, TypeError):
        return None


def render_html(summary: DatasetSummary, report: DatasetReport) -> str:
    """The whole report as one HTML page, its charts inlined."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ftkit dataset report</title>",
        f"<style>{_CSS}</style></head><body><h1>Dataset report</h1>",
        _table(
            "Examples",
            ["", "count"],
            [
                ("train", summary.train),
                ("validation", summary.validation),
                ("paraphrases (train only)", summary.paraphrases),
                ("negatives", summary.negatives),
            ],
        ),
        _table("Answers by gate", ["outcome", "answers"], list(summary.answers.items())),
        _table("This run: grounding check", ["gate", "answers"], Counter(report.grounding).most_common()),
        _table("This run: curation", ["step", "count"], Counter(report.curation).most_common()),
        "<h2>Lengths</h2>",
        _histogram(summary.question_words, "question length (words)"),
        _histogram(summary.answer_words, "answer length (words)"),
        _table(
            "Coverage by source",
            ["source", "chunks", "with examples", "without examples"],
            [(s.spec, s.chunks, s.with_examples, s.without_examples) for s in summary.sources],
        ),
        _coverage_chart(summary.sources),
        _table("Chunks without examples", ["document", "heading", "why"], summary.uncovered),
        f"<h2>{len(summary.samples)} random examples</h2>",
        *(_example(sample) for sample in summary.samples),
        "</body></html>",
    ]
    return "\n".join(parts)


_CSS = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left}.ex{border-left:3px solid #69c;padding:.2em .8em;margin:1em 0}.meta{color:#666;font-size:.85em}.ex p{white-space:pre-wrap}svg{background:#fafafa;border:1px solid #eee}"
)


def _table(title: str, header: list[str], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body or '<tr><td>none</td></tr>'}</table>"


def _example(sample: dict[str, str]) -> str:
    return (
        f"<div class='ex'><p class='meta'>{html.escape(sample['split'])} · {html.escape(sample['kind'])}</p>"
        f"<p><b>{html.escape(sample['question'])}</b></p><p>{html.escape(sample['answer'])}</p></div>"
    )


def _histogram(values: list[int], label: str) -> str:
    """An SVG histogram of `values`, at most 20 bins of whole numbers."""
    low, high = (min(values), max(values)) if values else (0, 0)
    width = max(1, -(-(high - low + 1) // 20))  # bins of whole numbers, 20 at most
    counts = Counter((v - low) // width for v in values)
    n_bins, top = (high - low) // width + 1, max(counts.values(), default=1)
    bar = CHART_WIDTH / n_bins
    bars = "".join(
        f"<rect x='{i * bar:.1f}' y='{CHART_HEIGHT - counts[i] / top * CHART_HEIGHT:.1f}' width='{bar - 1:.1f}'"
        f" height='{counts[i] / top * CHART_HEIGHT:.1f}' fill='#69c'><title>{low + i * width}–"
        f"{low + (i + 1) * width - 1}: {counts[i]}</title></rect>"
        for i in range(n_bins)
    )
    bars += "".join(
        f"<text x='{i * bar + bar / 2:.1f}' y='{CHART_HEIGHT + 14}' font-size='10' text-anchor='middle'>"
        f"{low + i * width}</text>"
        for i in range(n_bins)
    )
    axis = f"{label}: {low} to {high}, tallest bar {top} examples"
    return _svg(bars, axis)


def _coverage_chart(sources: list[SourceCoverage]) -> str:
    """An SVG bar per source: chunks with examples, then those without."""
    most = max((s.chunks for s in sources), default=1) or 1
    row = CHART_HEIGHT / max(1, len(sources))
    bars = ""
    for i, s in enumerate(sources):
        covered, rest = s.with_examples / most * CHART_WIDTH, s.without_examples / most * CHART_WIDTH
        y, h = i * row + 2, row - 4
        bars += f"<rect x='0' y='{y:.1f}' width='{covered:.1f}' height='{h:.1f}' fill='#69c'>"
        bars += f"<title>{html.escape(s.spec)}: {s.with_examples} with examples</title></rect>"
        bars += f"<rect x='{covered:.1f}' y='{y:.1f}' width='{rest:.1f}' height='{h:.1f}' fill='#e96'>"
        bars += f"<title>{html.escape(s.spec)}: {s.without_examples} without</title></rect>"
        bars += f"<text x='4' y='{y + h / 2 + 4:.1f}' font-size='11'>{html.escape(s.spec[-60:])}</text>"
    return _svg(bars, "chunks per source: blue with examples, orange without (hover for numbers)")


def _svg(body: str, caption: str) -> str:
    return (
        f"<figure><svg width='{CHART_WIDTH}' height='{CHART_HEIGHT + 20}'"
        f" role='img'>{body}</svg><figcaption>{html.escape(caption)}</figcaption></figure>"
    )
