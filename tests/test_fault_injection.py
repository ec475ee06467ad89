"""`ftkit run` against a faulty endpoint over real HTTP: the run completes and the books balance."""

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.stages.grounding import UNCHECKED
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Faults, docs_responder

# 20 % 429 with Retry-After, 5 % 500, 2 % answers slower than the client's timeout, 5 % malformed answers.
# With seed 19 every kind of fault comes within the first ten requests.
FAULTS = Faults(rate_limited=0.20, server_error=0.05, timeout=0.02, malformed=0.05, seed=19, timeout_s=2.5)
QUESTIONS_PER_CHUNK = 3


@pytest.fixture
def faulty_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(docs_responder, api_key=TEST_KEY, faults=FAULTS) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        monkeypatch.setenv("FTKIT_MAX_RETRIES", "12")
        monkeypatch.setenv("FTKIT_REQUEST_TIMEOUT_S", "1")
        yield fake


def rows(db: sqlite3.Connection, sql: str) -> list[tuple]:
    return db.execute(sql).fetchall()


def test_a_run_against_a_faulty_endpoint_completes_and_the_books_balance(
    runner: CliRunner, faulty_llm: FakeOpenAI
) -> None:
    result = runner.invoke(app, ["--workspace", "ws", "run", str(SAMPLE_DOCS), "--product", "Quillstack"])

    assert result.exit_code == 0, result.stderr
    assert set(faulty_llm.faults_injected) == {"rate_limited", "server_error", "timeout", "malformed"}
    assert (faulty_llm.invalid_requests, faulty_llm.responder_errors) == ([], [])
    with sqlite3.connect(Path("ws/state.db")) as db:
        assert_question_sets_balance(db)
        assert_rejects_have_reasons(db)
        assert_one_answer_per_accepted_question(db)
        assert_each_request_recorded_once(db, faulty_llm)
        assert_dataset_holds_the_accepted_answers(db)
    db.close()


def assert_question_sets_balance(db: sqlite3.Connection) -> None:
    """Every active chunk has a question set; it gets all its questions or records why not."""
    sets = rows(
        db,
        "SELECT s.n_accepted, s.reason,"
        " (SELECT count(*) FROM questions q WHERE q.chunk_id = c.id AND q.status = 'accepted')"
        " FROM chunks c LEFT JOIN question_sets s ON s.chunk_id = c.id WHERE c.status = 'active'",
    )
    assert sets and [n_accepted for n_accepted, _, _ in sets] == [counted for _, _, counted in sets]
    assert [(n == QUESTIONS_PER_CHUNK) == (reason is None) for n, reason, _ in sets] == [True] * len(sets)


def assert_rejects_have_reasons(db: sqlite3.Connection) -> None:
    """A rejected question or answer says why; an accepted one has no reason, or says it was never checked."""
    for table in ("questions", "answers"):
        assert rows(db, f"SELECT reason FROM {table} WHERE status = 'rejected' AND reason IS NULL") == []
        kept = rows(db, f"SELECT reason FROM {table} WHERE status = 'accepted' AND reason IS NOT NULL")
        # only a judge that twice gave no verdict (two malformed replies) keeps an answer with a reason, saying so
        assert [reason for (reason,) in kept if not reason.startswith(UNCHECKED)] == []


def assert_one_answer_per_accepted_question(db: sqlite3.Connection) -> None:
    """Every accepted question has exactly one answer row, accepted or rejected."""
    answer_counts = rows(
        db,
        "SELECT count(a.question_id) FROM questions q LEFT JOIN answers a ON a.question_id = q.id"
        " WHERE q.status = 'accepted' GROUP BY q.id",
    )
    assert answer_counts and set(answer_counts) == {(1,)}


def assert_each_request_recorded_once(db: sqlite3.Connection, fake: FakeOpenAI) -> None:
    """Each distinct request the server saw is in the ledger once, however often it was retried."""
    recorded = [json.loads(request) for (request,) in rows(db, "SELECT request_json FROM llm_calls")]
    sent = {json.dumps(body, sort_keys=True) for body in fake.requests}
    assert sorted(json.dumps(r, sort_keys=True) for r in recorded) == sorted(sent)
    assert len(fake.requests) > len(recorded)  # the faults were retried


def assert_dataset_holds_the_accepted_answers(db: sqlite3.Connection) -> None:
    """The written dataset has one line per accepted answer."""
    files = [Path(f"ws/dataset/{name}.jsonl") for name in ("train", "validation")]
    lines = sum(len(path.read_text().splitlines()) for path in files)
    assert rows(db, "SELECT count(*) FROM answers WHERE status = 'accepted'") == [(lines,)]
