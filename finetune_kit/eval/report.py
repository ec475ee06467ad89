"""The eval's report: a terminal table, report.html (self-contained), report.md, results.jsonl, chart.png and
summary.json in <workspace>/eval/<run>/; and what changed between two runs."""

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from finetune_kit.disk_space import written_whole
from finetune_kit.errors import ConfigError
from finetune_kit.eval.arms import ArmAnswer
from finetune_kit.eval.judge import Judgement
from finetune_kit.eval.metrics import METRICS, Estimate
from finetune_kit.eval.questions import EvalQuestion
from finetune_kit.eval.summary import EvalSummary

TABLE_METRICS = tuple(METRICS)  # every metric, in METRICS' order; a column no arm has is left out
DISAGREEMENTS = 10


def shown(metric: str, estimate: Estimate, interval: bool = True) -> str:
    """A figure as a cell: "42 % (30–55)", "0.61 (0.50–0.70)", "812 ms (700–905)", "$0.00012"."""
    if estimate.value is None:
        return "–"
    kind = METRICS[metric][2]
    if kind == "pct":
        fmt, scale, unit = "{:.0f}", 100.0, " %"
    elif kind == "num":
        fmt, scale, unit = "{:.2f}", 1.0, ""
    elif kind == "ms":
        fmt, scale, unit = "{:.0f}", 1.0, " ms"
    else:
        return f"${estimate.value:.5f}"
    cell = fmt.format(estimate.value * scale) + unit
    if interval and estimate.low is not None and estimate.high is not None:
        cell += f" ({fmt.format(estimate.low * scale)}–{fmt.format(estimate.high * scale)})"
    return cell


def _columns(summary: EvalSummary) -> list[str]:
    return [m for m in TABLE_METRICS if any(a.metrics[m].n for a in summary.arms)]


def summary_table(summary: EvalSummary, width: int | None = None) -> Table:
    """One row per arm, a 95 % interval in each cell; on a terminal narrower than that, one column per arm.

    Eleven metrics across need some 230 columns; four arms across fit in 80.
    """
    columns = _columns(summary)
    rows = [[arm.name, arm.model, *(shown(m, arm.metrics[m]) for m in columns)] for arm in summary.arms]
    header = ["arm", "model", *(METRICS[m][0] for m in columns)]
    table = Table(title=f"ftkit eval {summary.run}: {summary.n_questions} questions", header_style="bold")
    table.caption = summary.verdict
    if width is None or _natural_width([header, *rows]) <= width:
        for n, name in enumerate(header):
            table.add_column(name, justify="right" if n > 1 else "left")
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("metric")
    for arm in summary.arms:
        table.add_column(arm.name, justify="right", overflow="fold")
    for n, name in enumerate(header[1:], start=1):
        table.add_row(name, *(row[n] for row in rows))
    return table


def _natural_width(rows: list[list[str]]) -> int:
    """The characters a rich table needs to show these rows unwrapped: each column's widest cell, padding, rules."""
    return sum(max(len(row[n]) for row in rows) + 3 for n in range(len(rows[0]))) + 1


def markdown_table(summary: EvalSummary) -> str:
    """The summary table as GitHub Markdown."""
    columns = _columns(summary)
    lines = [
        "| arm | model | " + " | ".join(METRICS[m][0] for m in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    lines += [
        f"| {a.name} | {a.model} | " + " | ".join(shown(m, a.metrics[m]) for m in columns) + " |"
        for a in summary.arms
    ]
    return "\n".join(lines)


def result_lines(
    summary: EvalSummary,
    questions: list[EvalQuestion],
    answers: list[ArmAnswer],
    judgements: dict[tuple[str, str], Judgement],
) -> list[dict[str, Any]]:
    """One record per question and arm: the answer, its sources, its verdict and every score."""
    by_id = {q.id: q for q in questions}
    records: list[dict[str, Any]] = []
    for a in answers:
        q, j = by_id[a.question_id], judgements.get((a.question_id, a.arm))
        records.append(
            {
                "question_id": q.id,
                "question": q.question,
                "arm": a.arm,
                "model": a.model,
                "answer": a.answer,
                "reference": q.reference,
                "answerable": q.answerable,
                "gold_paths": list(q.gold_paths),
                "verdict": j.verdict if j else None,
                "judge_reason": j.reason if j else None,
                "judge_attempts": j.attempts if j else 0,
                "scores": summary.scores[(q.id, a.arm)],
                "latency_ms": a.latency_ms,
                "cost_usd": a.cost_usd,
                "cached": a.cached,
                "error": a.error,
                "refused_before_model": a.refused_before_model,  # the relevance gate answered, no call
                "claims": _claims(a),
                "claims_unjudged": a.support.reason if a.support and a.support.unjudged else None,
                "claims_attempts": a.support.attempts if a.support else 0,
                "sources": a.sources,
                "retrieved": a.retrieved,
            }
        )
    return records


def _claims(answer: ArmAnswer) -> list[dict[str, Any]] | None:
    """The judge's claims and whether the sources support each; None when not checked or unjudged."""
    if answer.support is None or answer.support.unjudged:
        return None
    return [{"claim": claim, "supported": ok} for claim, ok in answer.support.claims]


def disagreements(summary: EvalSummary, questions: list[EvalQuestion], n: int = DISAGREEMENTS) -> list[str]:
    """The ids of the `n` questions whose arms' scores spread the most (judge score, then token F1)."""
    arms = [a.name for a in summary.arms]

    def spread(question: EvalQuestion) -> tuple[float, float]:
        keys = [summary.scores.get((question.id, arm), {}) for arm in arms]
        found = []
        for metric in ("correct", "token_f1"):
            values = [s[metric] for s in keys if s.get(metric) is not None]
            found.append(max(values) - min(values) if len(values) > 1 else 0.0)  # type: ignore[type-var,operator]
        return found[0], found[1]

    ranked = sorted(questions, key=spread, reverse=True)
    return [q.id for q in ranked[:n] if len(arms) > 1 and spread(q) > (0.0, 0.0)]


def warm_chart() -> None:
    """Import matplotlib and draw a throwaway chart (its fonts and caches load on first use: a second or two),
    so that the report, written after the last call, does not wait for it; run on a thread during the calls."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1), dpi=20)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(["a"], [1.0], yerr=[[0.1], [0.1]])
    axes.set_title("warm")
    figure.tight_layout()
    figure.savefig(io.BytesIO(), format="png")


def chart_png(summary: EvalSummary) -> bytes:
    """A bar chart per metric (an arm a bar, its 95 % interval a whisker) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display: terminals, CI
    from matplotlib.figure import Figure

    columns = _columns(summary) or ["token_f1"]
    cols = 3
    rows = (len(columns) + cols - 1) // cols
    figure = Figure(figsize=(4 * cols, 3 * rows), dpi=100)
    for i, metric in enumerate(columns):
        axes = figure.add_subplot(rows, cols, i + 1)
        names = [a.name for a in summary.arms]
        values = [a.metrics[metric].value or 0.0 for a in summary.arms]
        low = [max(0.0, v - (a.metrics[metric].low or v)) for v, a in zip(values, summary.arms, strict=True)]
        high = [
            max(0.0, (a.metrics[metric].high or v) - v) for v, a in zip(values, summary.arms, strict=True)
        ]
        axes.bar(names, values, yerr=[low, high], capsize=4, color="#4c78a8")
        axes.set_title(METRICS[metric][0])
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(
    run_dir: Path,
    summary: EvalSummary,
    questions: list[EvalQuestion],
    answers: list[ArmAnswer],
    judgements: dict[tuple[str, str], Judgement],
) -> list[Path]:
    """Write summary.json, results.jsonl, chart.png, report.md and report.html into `run_dir`."""
    records = result_lines(summary, questions, answers, judgements)
    png = chart_png(summary)
    texts = {
        "summary.json": json.dumps(summary.to_json(), indent=2, ensure_ascii=False),
        "results.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        "report.md": report_markdown(summary),
        "report.html": report_html(summary, questions, records, png),
    }
    written = [_write(run_dir / "chart.png", png)]
    written += [_write(run_dir / name, text.encode("utf-8")) for name, text in texts.items()]
    return written


def _write(path: Path, data: bytes) -> Path:
    with written_whole(path, needed=lambda: len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def report_markdown(summary: EvalSummary) -> str:
    """report.md: the verdict, the table, the pairs and the notes."""
    lines = [f"# ftkit eval {summary.run}", "", summary.verdict, "", markdown_table(summary), ""]
    lines += [
        "## Arm against arm",
        "",
        "| pair | score | wins | ties | losses | sign test p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p.a} vs {p.b} | {METRICS[p.metric][0]} | {p.wins} | {p.ties} | {p.losses} | {p.p_value:.3g}"
        f"{' (significant)' if p.significant else ''} |"
        for p in summary.pairs
    ]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in summary.notes] + [""]
    lines += [
        f"Judge: {summary.judge_model or 'none'}. Calls paid: {summary.calls_paid}, from the cache: "
        f"{summary.cache_hits}, spent ${summary.spent_usd:.4f}.",
        "",
    ]
    return "\n".join(lines)


def report_html(
    summary: EvalSummary, questions: list[EvalQuestion], records: list[dict[str, Any]], png: bytes
) -> str:
    """report.html: the verdict, the table, the chart (inline PNG) and the questions the arms disagree on most."""
    e = html.escape
    columns = _columns(summary)
    head = "".join(f"<th>{e(METRICS[m][0])}</th>" for m in columns)
    rows = "".join(
        f"<tr><td>{e(a.name)}</td><td>{e(a.model)}</td>"
        + "".join(f"<td>{e(shown(m, a.metrics[m]))}</td>" for m in columns)
        + "</tr>"
        for a in summary.arms
    )
    chart = base64.b64encode(png).decode("ascii")
    notes = "".join(f"<li>{e(n)}</li>" for n in summary.notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>ftkit eval {e(summary.run)}</title><style>{_CSS}</style></head><body>"
        f"<h1>ftkit eval {e(summary.run)}</h1><p class='verdict'>{e(summary.verdict)}</p>"
        f"<table><tr><th>arm</th><th>model</th>{head}</tr>{rows}</table>"
        "<p class='small'>Cells: the figure and its bootstrap 95 % interval over the questions.</p>"
        f"<img alt='metrics per arm' src='data:image/png;base64,{chart}'>"
        f"<h2>Notes</h2><ul>{notes}</ul>"
        f"<h2>Where the arms disagree most</h2>{_disagreement_html(summary, questions, records)}"
        "</body></html>"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
    ".verdict{font-size:1.15em;font-weight:600}.small{color:#666;font-size:.9em}img{max-width:100%}"
    ".answers td{width:25%;font-size:.9em;white-space:pre-wrap}"
)


def _disagreement_html(
    summary: EvalSummary, questions: list[EvalQuestion], records: list[dict[str, Any]]
) -> str:
    e = html.escape
    by_key = {(str(r["question_id"]), str(r["arm"])): r for r in records}
    by_id = {q.id: q for q in questions}
    blocks = []
    for qid in disagreements(summary, questions):
        q = by_id[qid]
        cells = ""
        for arm in summary.arms:
            r = by_key[(qid, arm.name)]
            sources = (
                ", ".join(str(s.get("url") or s.get("path")) for s in r["sources"]) if r["sources"] else ""
            )
            cells += (
                f"<td><b>{e(arm.name)}</b> · {e(str(r['verdict'] or '–'))}<br>{e(str(r['answer']))}"
                + (f"<br><i>sources: {e(sources)}</i>" if sources else "")
                + "</td>"
            )
        blocks.append(
            f"<h3>{e(q.question)}</h3><p class='small'>reference: {e(q.reference or '–')} · gold: "
            f"{e(', '.join(q.gold_paths) or '–')}</p><table class='answers'><tr>{cells}</tr></table>"
        )
    return "".join(blocks) or "<p>The arms agree on every question.</p>"


def load_summary(workspace: Path, run: str) -> EvalSummary:
    """The summary of eval run `run` (a folder name under <workspace>/eval, or a path to one)."""
    folder = Path(run) if Path(run).is_dir() else workspace / "eval" / run
    path = folder / "summary.json"
    try:
        return EvalSummary.from_json(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        runs = sorted(p.parent.name for p in (workspace / "eval").glob("*/summary.json"))
        raise ConfigError(
            f"{path}: no such eval run ({exc.strerror}) — runs: {', '.join(runs) or 'none yet'}"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an ftkit eval summary ({exc}) — re-run the eval") from exc


def compare_table(a: EvalSummary, b: EvalSummary) -> Table:
    """What changed from run `a` to run `b`: per arm and metric, both figures and the difference."""
    table = Table(title=f"ftkit eval: {a.run} → {b.run}", header_style="bold")
    for column in ("arm", "metric", a.run, b.run, "change"):
        table.add_column(column, justify="left" if column in ("arm", "metric") else "right")
    for arm in dict.fromkeys([x.name for x in a.arms] + [x.name for x in b.arms]):
        old, new = a.arm(arm), b.arm(arm)
        for metric in TABLE_METRICS:
            before = old.metrics[metric] if old else Estimate(None, None, None, 0)
            after = new.metrics[metric] if new else Estimate(None, None, None, 0)
            if before.value is None and after.value is None:
                continue
            table.add_row(
                arm,
                METRICS[metric][0],
                shown(metric, before),
                shown(metric, after),
                _change(metric, before, after),
            )
    table.caption = f"{a.run}: {a.verdict}\n{b.run}: {b.verdict}"
    return table


def _change(metric: str, before: Estimate, after: Estimate) -> str:
    if before.value is None or after.value is None:
        return "new" if before.value is None else "gone"
    delta = Estimate(after.value - before.value, None, None, 0)
    cell = shown(metric, delta, interval=False)
    return cell if after.value < before.value else "+" + cell
