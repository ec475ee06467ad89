"""Spending controls: --dry-run sends nothing, --max-cost stops cleanly, the ledger adds up."""

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import ModelPrice, load_settings
from finetune_kit.llm.budget import Budget, worst_case_cost
from finetune_kit.llm.client import ChatRequest
from finetune_kit.stages.estimate import estimate_generation
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI

RUN = ["--workspace", "ws", "run", str(SAMPLE_DOCS), "--product", "Quillstack", "--model", "gpt-4o-mini"]
REQUEST = ChatRequest("s", (("user", "hello world"),), temperature=0, max_tokens=100, template_version="p1:x")


def test_worst_case_cost_counts_prompt_and_max_tokens() -> None:
    price = ModelPrice(input=1.0, output=2.0)
    assert worst_case_cost(REQUEST, price) == (3 + 4 + 2 + 100 * 2) / 1e6  # 9 prompt tokens at $1, 100 at $2


def test_budget_refuses_a_reservation_that_could_cross_the_limit() -> None:
    budget = Budget(limit_usd=0.0005)
    price = ModelPrice(input=1.0, output=2.0)
    first = budget.reserve(REQUEST, price)
    budget.settle(first, 0.0001)
    budget.reserve(REQUEST, price)
    try:
        budget.reserve(REQUEST, price)
    except Exception as exc:
        assert str(exc).startswith("stopped at the budget: $0.0001 of --max-cost $0.00 spent")
    else:
        raise AssertionError("the third reservation should cross the limit")


def test_dry_run_sends_nothing_and_prices_every_planned_call(
    runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the grounding judge's calls are estimated and batched in test_grounding.py
    monkeypatch.setenv("FTKIT_GROUNDING_JUDGE", "false")
    result = runner.invoke(app, [*RUN, "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert fake_llm.requests == []
    assert "Dry run: nothing was sent." in result.stdout
    settings = load_settings(workspace=Path("ws"), product="Quillstack", model="gpt-4o-mini")
    with Store(settings.db_path) as store:
        questions, answers = estimate_generation(store, settings)
        chunks = store.scalar("SELECT count(*) FROM chunks WHERE status = 'active'")
    assert (questions.calls, answers.calls, answers.extrapolated) == (chunks, 3 * chunks, True)
    assert questions.max_completion_tokens == chunks * settings.question_max_tokens
    price = settings.price_for("gpt-4o-mini")
    expected = (questions.prompt_tokens * price.input + questions.max_completion_tokens * price.output) / 1e6
    assert abs(questions.max_cost_usd - expected) < 1e-12
    assert f"${questions.max_cost_usd + answers.max_cost_usd:.4f}" in result.stdout


def test_dry_run_after_a_run_counts_only_uncached_calls(
    runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the grounding judge's calls are estimated and batched in test_grounding.py
    monkeypatch.setenv("FTKIT_GROUNDING_JUDGE", "false")
    assert runner.invoke(app, RUN).exit_code == 0
    settings = load_settings(workspace=Path("ws"), product="Quillstack", model="gpt-4o-mini")
    with Store(settings.db_path) as store:
        assert [e.calls for e in estimate_generation(store, settings)] == [0, 0]


def test_batch_dry_run_is_half_price(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    assert runner.invoke(app, [*RUN, "--dry-run"]).exit_code == 0
    live = load_settings(workspace=Path("ws"), product="Quillstack", model="gpt-4o-mini")
    batch = load_settings(workspace=Path("ws"), product="Quillstack", model="gpt-4o-mini", batch=True)
    with Store(live.db_path) as store:
        full, half = estimate_generation(store, live), estimate_generation(store, batch)
    assert [round(h.max_cost_usd * 2, 12) for h in half] == [round(f.max_cost_usd, 12) for f in full]


def test_max_cost_stops_cleanly_and_a_higher_budget_finishes(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    stopped = runner.invoke(app, [*RUN, "--max-cost", "0.002"])
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith("Error: stopped at the budget: $0.00")
    assert stopped.stderr.endswith("— re-run with a higher --max-cost to continue (finished work is kept)\n")
    db = sqlite3.connect("ws/state.db")
    spent = db.execute("SELECT sum(cost_usd) FROM llm_calls").fetchone()[0]
    assert 0 < spent <= 0.002
    calls = len(fake_llm.requests)

    finished = runner.invoke(app, [*RUN, "--max-cost", "1"])
    assert finished.exit_code == 0, finished.stderr
    assert Path("ws/dataset/train.jsonl").is_file()
    repeated = {r["messages"][0]["content"] for r in fake_llm.requests[:calls]} & {
        r["messages"][0]["content"] for r in fake_llm.requests[calls:]
    }
    assert repeated == set()  # what the stopped run paid for was not asked again


def test_batch_needs_the_openai_api(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--workspace", "ws", "run", str(SAMPLE_DOCS), "--batch"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: --batch uses the OpenAI Batch API — set OPENAI_API_KEY (or --provider openai), or drop --batch\n"
    )


def test_batch_mode_builds_the_dataset_at_half_price_without_live_calls(
    runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_BATCH_POLL_INTERVAL_S", "0.01")
    # the grounding judge's calls are estimated and batched in test_grounding.py
    monkeypatch.setenv("FTKIT_GROUNDING_JUDGE", "false")
    result = runner.invoke(app, [*RUN, "--batch"])
    assert result.exit_code == 0, result.stderr
    assert Path("ws/dataset/train.jsonl").is_file()
    assert fake_llm.requests == []  # every completion came through the Batch API
    assert [call for call in fake_llm.batch_api.calls if call == "POST /v1/batches"] == [
        "POST /v1/batches"
    ] * 2
    db = sqlite3.connect("ws/state.db")
    paid = db.execute(
        "SELECT sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) FROM llm_calls"
    ).fetchone()
    price = load_settings().price_for("gpt-4o-mini")
    assert abs(paid[2] - 0.5 * (paid[0] * price.input + paid[1] * price.output) / 1e6) < 1e-12
    assert db.execute("SELECT count(*) FROM batches WHERE merged_at IS NOT NULL").fetchone()[0] == 2
