"""Follow-ups condensed into one standalone question: no call for a first message, one cached call after."""

from pathlib import Path

import pytest

from finetune_kit.config import load_settings
from finetune_kit.retrieval.followup import (
    MAX_CONDENSED_CHARS,
    MAX_HISTORY_TURNS,
    clean_condensation,
    format_history,
    retrieval_query,
    standalone_question,
)
from finetune_kit.slack.answerer import Turn
from tests.fake_openai import FakeOpenAI, Reply, _last_user_text

HISTORY = [
    Turn("user", "How do I create an SDK key in Beacon?"),
    Turn("assistant", "Open Settings > Keys and press New key [1]."),
]
FOLLOW_UP = "and how do I rotate it?"
CONDENSED = "How do I rotate an SDK key in Beacon?"


def condensing_responder(body: dict) -> Reply:
    """A model that condenses a follow-up about SDK keys, and says so only when asked to condense."""
    prompt = _last_user_text(body)
    assert "Follow-up message: and how do I rotate it?" in prompt
    assert "User: How do I create an SDK key in Beacon?" in prompt
    return Reply(content=f"Standalone question: {CONDENSED}\n\nThis question asks about rotating keys.")


@pytest.fixture
def condenser(monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    with FakeOpenAI(condensing_responder) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        yield fake


def settings_in(tmp_path: Path):
    return load_settings(workspace=tmp_path / "ws", provider="openai", model="fake-model", product="Beacon")


def test_first_message_makes_no_call(tmp_path: Path, condenser: FakeOpenAI) -> None:
    assert standalone_question(settings_in(tmp_path), [], "How do I rotate an SDK key?") == (
        "How do I rotate an SDK key?"
    )
    assert condenser.requests == []
    assert not (tmp_path / "ws").exists()  # not even the workspace's cache was opened


def test_follow_up_is_one_cached_call_that_keeps_the_raw_message(
    tmp_path: Path, condenser: FakeOpenAI
) -> None:
    settings = settings_in(tmp_path)

    first = standalone_question(settings, HISTORY, FOLLOW_UP)
    again = standalone_question(settings, HISTORY, FOLLOW_UP)

    assert first == f"{CONDENSED}\n{FOLLOW_UP}"
    assert again == first
    assert len(condenser.requests) == 1  # the re-run came from the cache
    assert condenser.invalid_requests == []


def test_a_different_follow_up_is_a_new_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(lambda body: Reply(content=CONDENSED)) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        settings = settings_in(tmp_path)
        standalone_question(settings, HISTORY, FOLLOW_UP)
        standalone_question(settings, HISTORY, "and can I rotate it from the CLI?")

    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    "output",
    [
        "",
        "   \n\n",
        "Standalone question:",
        "What is the capital of France?",
        "Reply with the question only.",
    ],
)
def test_garbage_falls_back_to_the_raw_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    with FakeOpenAI(lambda body: Reply(content=output)) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
        query = standalone_question(settings_in(tmp_path), HISTORY, FOLLOW_UP)

    assert query == FOLLOW_UP
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (CONDENSED, CONDENSED),
        (f'1. "{CONDENSED}"', CONDENSED),
        (f"\nQuestion: {CONDENSED} It is done in Settings > Keys.", CONDENSED),
        (f"**{CONDENSED}**\nmore text", CONDENSED),
        ("rotate", None),  # one word is no question
        ("Follow-up message: and how do I rotate it?", None),  # the prompt echoed
    ],
)
def test_clean_condensation(output: str, expected: str | None) -> None:
    assert clean_condensation(output, HISTORY, FOLLOW_UP) == expected


def test_a_rambling_condensation_is_capped() -> None:
    rambling = "How do I rotate the SDK key " + "and also the other keys " * 40

    cleaned = clean_condensation(rambling, HISTORY, FOLLOW_UP)

    assert cleaned is not None
    assert len(cleaned) <= MAX_CONDENSED_CHARS + 1
    assert cleaned.startswith("How do I rotate the SDK key and also")


@pytest.mark.parametrize(
    ("condensed", "expected"),
    [
        (None, FOLLOW_UP),
        ("And how do I rotate it", FOLLOW_UP),  # says the same as the message: searched once
        (CONDENSED, f"{CONDENSED}\n{FOLLOW_UP}"),
    ],
)
def test_retrieval_query_keeps_the_raw_message(condensed: str | None, expected: str) -> None:
    assert retrieval_query(condensed, FOLLOW_UP) == expected


def test_history_keeps_the_newest_turns_cut_short() -> None:
    turns = [Turn("user", f"question {i}") for i in range(MAX_HISTORY_TURNS + 3)]
    turns.append(Turn("assistant", "word " * 500))

    lines = format_history(turns).splitlines()

    assert len(lines) == MAX_HISTORY_TURNS
    assert lines[0] == "User: question 4"
    assert lines[-1].startswith("Assistant: word word") and lines[-1].endswith("…")
    assert len(lines[-1]) < 700
