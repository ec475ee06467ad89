"""Turn reports into text and tables for the terminal (cli.py does the printing)."""

from collections import Counter

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgressBar
from rich.table import Table
from rich.text import Text

from finetune_kit.pipeline import RunSummary
from finetune_kit.stages.build_dataset import DatasetReport
from finetune_kit.stages.estimate import StageEstimate
from finetune_kit.stages.ingest import IngestReport
from finetune_kit.status import StatusReport


class RateColumn(ProgressColumn):
    """Items per second (or per minute when slow)."""

    def render(self, task: Task) -> Text:
        """The task's current rate."""
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("– /s", style="progress.data.speed")
        return Text(f"{speed:.1f}/s" if speed >= 1 else f"{speed * 60:.1f}/min", style="progress.data.speed")


class RichProgress:
    """A Progress that draws one bar per stage with count, rate and ETA."""

    def __init__(self, bar: RichProgressBar) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    @staticmethod
    def make_bar(console: Console) -> RichProgressBar:
        """The bar layout ftkit uses everywhere; drawn only on a terminal, so logs and pipes stay clean."""
        return RichProgressBar(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )

    def start(self, stage: str, total: int) -> None:
        """Add a bar for `stage`."""
        self.task = self.bar.add_task(stage, total=total)

    def advance(self, n: int = 1) -> None:
        """Move the current bar."""
        if self.task is not None:
            self.bar.advance(self.task, n)

    def grow(self, n: int) -> None:
        """Raise the current bar's total."""
        if self.task is not None:
            task = next(task for task in self.bar.tasks if task.id == self.task)
            self.bar.update(self.task, total=(task.total or 0) + n)

    def finish(self) -> None:
        """Leave the finished bar on screen."""
        self.task = None

    def beside(self) -> "RichProgress":
        """Another bar on the same display, for a stage that runs alongside."""
        return RichProgress(self.bar)

    def note(self, line: str) -> None:
        """One plain line above the bars, on the bars' console (stderr)."""
        self.bar.console.print(line, markup=False, emoji=False, highlight=False)


def ingest_lines(report: IngestReport) -> list[str]:
    """What ingest changed, as plain lines."""
    lines = [
        f"Ingested {report.sources} source(s): {report.documents_new} new documents, "
        f"{report.documents_unchanged} unchanged, {report.documents_rechunked} re-chunked, "
        f"{report.documents_retired} retired; {report.chunks_new} new chunks, {report.chunks_retired} retired."
    ]
    if report.skipped:
        lines.append(f"Skipped {len(report.skipped)} file(s):")
        lines += [f"  {path}: {reason}" for path, reason in report.skipped]
    if report.failed_sources:
        lines.append(f"Left out {len(report.failed_sources)} source(s) that gave no usable document:")
        lines += [f"  {message}" for _, message in report.failed_sources]
    return lines


def _reasons(counter: Counter[str]) -> str:
    return ", ".join(f"{reason} ×{n}" for reason, n in counter.most_common()) or "none"


def dataset_lines(report: DatasetReport) -> list[str]:
    """Paths, validation results and the training estimate."""
    lines = []
    for part in (report.train, report.validation):
        if part is not None:
            lines.append(
                f"Wrote {part.path} ({part.examples} examples, {part.duplicates} duplicates, "
                f"longest {part.max_example_tokens} tokens)"
            )
    lines.append(
        f"Estimated training: {report.estimated_training_tokens:,} tokens, ${report.estimated_cost_usd:.2f}"
    )
    return lines


def summary_table(summary: RunSummary) -> Table:
    """The final table of `ftkit run` and the generation commands."""
    table = Table(title="ftkit summary", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    if summary.ingest:
        table.add_row(
            "documents (new / unchanged / retired)",
            f"{summary.ingest.documents_new} / "
            f"{summary.ingest.documents_unchanged} / {summary.ingest.documents_retired}",
        )
        table.add_row("chunks (new)", str(summary.ingest.chunks_new))
        table.add_row("files skipped", str(len(summary.ingest.skipped)))
        for _, message in summary.ingest.failed_sources:
            table.add_row("source left out", message)
        if summary.ingest.index is not None:
            table.add_row("search index", summary.ingest.index.line().removeprefix("Index: "))
    if summary.questions:
        q = summary.questions
        table.add_row("chunks (total / already done)", f"{q.chunks_total} / {q.chunks_done_before}")
        table.add_row("questions accepted (this run)", str(q.questions_accepted))
        table.add_row("question rejects", _reasons(q.rejects))
        table.add_row("chunks without questions", _reasons(q.chunks_without_questions))
    if summary.dataset:
        d = summary.dataset
        table.add_row("answers accepted (this run)", f"{d.answers_accepted} of {d.answered}")
        table.add_row("answer rejects", _reasons(d.rejects))
        if d.grounding:
            table.add_row("grounding check", _reasons(d.grounding))
        if d.curation:
            table.add_row("dataset curation", _reasons(d.curation))
        for note in d.notes:
            table.add_row("dataset note", note)
        if d.train and d.validation:
            table.add_row("examples (train / validation)", f"{d.train.examples} / {d.validation.examples}")
        table.add_row(
            "estimated training", f"{d.estimated_training_tokens:,} tokens, ${d.estimated_cost_usd:.2f}"
        )
    table.add_row("LLM calls (made / cached)", f"{summary.llm_calls} / {summary.cache_hits}")
    table.add_row(
        "tokens (prompt / completion)", f"{summary.prompt_tokens:,} / {summary.completion_tokens:,}"
    )
    table.add_row("cost", f"${summary.cost_usd:.4f}")
    for path in summary.files:
        table.add_row("output", str(path))
    return table


def estimate_table(estimates: list[StageEstimate]) -> Table:
    """What a dry run found: per stage, the calls, tokens and worst-case dollars."""
    table = Table(title="dry run: what this would spend at most", show_header=True, header_style="bold")
    for column in ("stage", "calls", "prompt tokens", "max completion tokens", "max cost"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    if any(e.extrapolated for e in estimates):
        table.caption = "* includes answers to the questions it has yet to write, N per chunk"
    for e in estimates:
        table.add_row(
            e.stage + " *" * e.extrapolated,
            f"{e.calls:,}",
            f"{e.prompt_tokens:,}",
            f"{e.max_completion_tokens:,}",
            f"${e.max_cost_usd:.4f}",
        )
    table.add_row(
        "total",
        f"{sum(e.calls for e in estimates):,}",
        f"{sum(e.prompt_tokens for e in estimates):,}",
        f"{sum(e.max_completion_tokens for e in estimates):,}",
        f"${sum(e.max_cost_usd for e in estimates):.4f}",
    )
    _add_calls_by_chunk_size(table, estimates)
    return table


def _add_calls_by_chunk_size(table: Table, estimates: list[StageEstimate]) -> None:
    """Rows under the totals: how many calls each chunk size range costs, across the stages."""
    calls_by_size: Counter[str] = Counter()
    for e in estimates:
        calls_by_size.update(dict(e.by_chunk_size))
    if not calls_by_size:
        return
    table.add_section()
    note = "chunks a–b: the calls for chunks of a to b tokens (under: never asked)"
    table.caption = f"{table.caption}\n{note}" if table.caption else note
    for bucket, calls in calls_by_size.items():
        table.add_row(f"chunks {bucket}", f"{calls:,}", "", "", "")


def status_table(report: StatusReport) -> Table:
    """`ftkit status`: what the workspace holds, coverage and the cost ledger."""
    table = Table(title=f"workspace {report.workspace}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for label, value in report.rows():
        table.add_row(label, value)
    return table
