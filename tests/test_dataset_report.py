"""The dataset report: report.html beside the JSONL, self-contained, and its summary in `ftkit status`."""

import json
import re
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.dataset_report import SAMPLES, read_dataset_summary
from tests.conftest import SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI

RUN = ["--workspace", "ws", "run", str(SAMPLE_DOCS), "--product", "Quillstack", "--model", "gpt-4o-mini"]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_dataset_writes_a_self_contained_report_that_matches_the_files(
    runner: CliRunner, fake_llm: FakeOpenAI
) -> None:
    result = runner.invoke(app, RUN)
    assert result.exit_code == 0, result.stderr

    page = Path("ws/dataset/report.html").read_text()
    train, validation = lines(Path("ws/dataset/train.jsonl")), lines(Path("ws/dataset/validation.jsonl"))
    summary = read_dataset_summary(Path("ws/dataset"))
    assert summary is not None
    assert (summary.train, summary.validation) == (len(train), len(validation))
    assert summary.answers["accepted"] == len(train) + len(validation)
    assert len(summary.question_words) == len(train) + len(validation)
    assert len(summary.samples) == SAMPLES and page.count("class='ex'") == SAMPLES
    assert page.count("<svg ") == 3  # two histograms and the coverage chart, inline
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing to fetch
    with sqlite3.connect("ws/state.db") as db:
        chunks = db.execute("SELECT count(*) FROM chunks WHERE status = 'active'").fetchone()[0]
    assert [s.spec for s in summary.sources] == [str(SAMPLE_DOCS)]
    assert summary.sources[0].chunks == chunks >= summary.sources[0].with_examples > 0
    assert "ws/dataset/report.html" in result.stdout
    without = summary.sources[0].chunks - summary.sources[0].with_examples
    assert len(summary.uncovered) == without and page.count("</tr>") >= without


def test_the_random_examples_are_seeded(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    assert runner.invoke(app, RUN).exit_code == 0
    first = read_dataset_summary(Path("ws/dataset"))
    assert runner.invoke(app, RUN).exit_code == 0
    again = read_dataset_summary(Path("ws/dataset"))
    assert runner.invoke(app, [*RUN, "--seed", "7"]).exit_code == 0
    other = read_dataset_summary(Path("ws/dataset"))
    assert first is not None and again is not None and other is not None
    assert first.samples == again.samples != other.samples


def test_status_shows_the_dataset_summary(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    assert runner.invoke(app, RUN).exit_code == 0
    summary = read_dataset_summary(Path("ws/dataset"))
    assert summary is not None

    result = runner.invoke(
        app, ["--workspace", "ws", "status", "--model", "gpt-4o-mini", "--product", "Quillstack"]
    )

    assert result.exit_code == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert f"dataset (train / validation) │ {summary.train} / {summary.validation}" in flat
    assert "dataset paraphrases / negatives │ 0 / 0" in flat
    covered = sum(s.with_examples for s in summary.sources)
    assert f"chunks with examples │ {covered} of {sum(s.chunks for s in summary.sources)}" in flat
    assert "grounding check │ pre-check on, judge on" in flat


def test_status_without_a_dataset_has_no_dataset_rows(runner: CliRunner, tmp_path: Path) -> None:
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nSome text about a thing that matters here.\n")
    assert runner.invoke(app, ["--workspace", "ws", "ingest", str(docs)]).exit_code == 0
    result = runner.invoke(app, ["--workspace", "ws", "status"])
    assert result.exit_code == 0, result.stderr
    assert "dataset (train" not in result.stdout
