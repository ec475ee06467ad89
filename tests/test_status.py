"""`ftkit status` tells what the workspace holds and who made it; a stage about to redo work says so first."""

import sqlite3

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import load_settings
from finetune_kit.status import workspace_status
from tests.conftest import SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI

LOCAL = "smollm2-135m-instruct at local:gguf:SmolLM2-135M-Instruct.Q4_1.gguf:"


def ftkit(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--workspace", "ws", *args])
    return result.exit_code, result.stdout, result.stderr


def status_rows() -> dict[str, list[str]]:
    """`ftkit status` as label → values, from the report the table is drawn from."""
    rows: dict[str, list[str]] = {}
    for label, value in workspace_status(load_settings(workspace="ws", product="Quillstack")).rows():
        rows.setdefault(label, []).append(value)
    return rows


@pytest.fixture
def made_with_a_key(fake_llm: FakeOpenAI) -> tuple[FakeOpenAI, int, int, int]:
    """A workspace whose questions and answers gpt-4o-mini wrote at the fake endpoint: (fake, chunks, answered, kept)."""
    assert ftkit("run", str(SAMPLE_DOCS), "--product", "Quillstack")[0] == 0
    with sqlite3.connect("ws/state.db") as db:
        chunks, answered, accepted = db.execute(
            "SELECT (SELECT count(*) FROM chunks), (SELECT count(*) FROM answers),"
            " (SELECT count(*) FROM answers WHERE status = 'accepted')"
        ).fetchone()
    assert 0 < accepted <= answered  # the grounding check may reject some
    return fake_llm, chunks, answered, accepted


def test_status_without_the_key_shows_what_the_keyed_run_made_and_what_would_be_redone(
    made_with_a_key: tuple[FakeOpenAI, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, chunks, answered, accepted = made_with_a_key
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    rows = status_rows()
    made = f"gpt-4o-mini at openai:{fake.url}"
    assert rows["questions made by"] == [
        f"{made}: {chunks} chunks, {answered} accepted (not the current settings)"
    ]
    assert rows["answers made by"] == [
        f"{made}: {answered} questions answered, {accepted} accepted (not the current settings)"
    ]
    [current] = rows["current settings"]
    assert current.startswith(LOCAL)
    per_chunk = load_settings().questions_per_chunk
    assert rows["settings changed"] == [
        f"generate-questions: {chunks} chunks have questions from {made}, not the current {current}; they will be"
        f" made again (next generate-questions: about {chunks} calls, then build-dataset about"
        f" {chunks * per_chunk})"
    ]
    assert rows["chunks with questions"] == ["0"]  # the current settings' own coverage, as before


def test_status_under_the_settings_that_made_the_work_says_nothing_changed(
    made_with_a_key: tuple[FakeOpenAI, int, int, int],
) -> None:
    fake, chunks, answered, accepted = made_with_a_key
    rows = status_rows()
    made = f"gpt-4o-mini at openai:{fake.url}"
    assert rows["questions made by"] == [
        f"{made}: {chunks} chunks, {answered} accepted (the current settings)"
    ]
    assert rows["answers made by"] == [
        f"{made}: {answered} questions answered, {accepted} accepted (the current settings)"
    ]
    assert rows["current settings"] == [made]
    assert "settings changed" not in rows


def test_a_stage_about_to_redo_finished_work_says_so_before_it_starts(
    made_with_a_key: tuple[FakeOpenAI, int, int, int],
) -> None:
    fake, chunks, _, _ = made_with_a_key
    calls = len(fake.requests)
    code, _, err = ftkit("generate-questions", "--product", "Quillstack", "--model", "gpt-4.1-mini")
    assert code == 0, err
    assert err == (
        f"generate-questions: {chunks} chunks have questions from gpt-4o-mini at openai:{fake.url}, not the"
        f" current gpt-4.1-mini at openai:{fake.url}; they will be made again\n"
    )
    assert len(fake.requests) == calls + chunks  # and it did ask them again
    code, _, err = ftkit("generate-questions", "--product", "Quillstack", "--model", "gpt-4.1-mini")
    assert (code, err) == (0, "")  # nothing left to redo: nothing said


def test_build_dataset_under_another_model_says_why_it_finds_no_questions(
    made_with_a_key: tuple[FakeOpenAI, int, int, int],
) -> None:
    fake, chunks, _, _ = made_with_a_key
    code, _, err = ftkit("build-dataset", "--product", "Quillstack", "--model", "gpt-4.1-mini")
    assert code == 1
    assert err.splitlines()[0] == (
        f"build-dataset: {chunks} chunks have questions from gpt-4o-mini at openai:{fake.url}, not the current"
        f" gpt-4.1-mini at openai:{fake.url}; build-dataset uses none of them — run generate-questions with these"
        " settings first, or return to those"
    )


def test_other_settings_of_the_same_model_are_named_as_such(
    made_with_a_key: tuple[FakeOpenAI, int, int, int],
) -> None:
    _, chunks, _, _ = made_with_a_key
    code, _, err = ftkit("generate-questions", "--product", "Quillstack", "-n", "2")
    assert code == 0
    assert err.splitlines()[0] == (
        f"generate-questions: {chunks} chunks have questions from other settings of this model (product, prompts,"
        " questions per chunk, temperature or max tokens); they will be made again"
    )
