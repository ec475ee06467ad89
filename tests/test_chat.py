"""`ftkit chat`: answers from the docs with memory in the state DB, follow-ups condensed, off-topic refused."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.chat import (
    Answered,
    ChatEvent,
    NotAnswered,
    Started,
    history,
    new_conversation,
    open_conversation,
    run_chat,
)
from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ExtraMissingError
from finetune_kit.retrieval.index import update_index
from finetune_kit.retrieval.types import Embedder
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, _last_user_text, docs_responder

pytest.importorskip("finetune_kit.retrieval.answer", reason="ftkit chat answers through retrieval/answer.py")

FIRST = "How do I archive a flag?"
FOLLOW_UP = "and can I bring it back later?"
CONDENSED = "Can I bring back an archived flag later?"


def chat_responder(body: dict) -> Reply:
    """Condenses a follow-up about archived flags; answers anything else from the docs in its prompt."""
    if "Follow-up message:" in _last_user_text(body):
        return Reply(content=CONDENSED)
    return docs_responder(body)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(chat_responder, api_key=TEST_KEY) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        monkeypatch.setenv("FTKIT_PROVIDER", "openai")
        monkeypatch.setenv("FTKIT_MODEL", "fake-model")
        monkeypatch.setenv("FTKIT_PRODUCT", "Quillstack")
        yield server


def lexical_only(settings: Settings) -> Embedder:
    """No local embedder: a BM25-only index, so the test embeds nothing (MiniLM takes minutes on 2 busy cores)."""
    raise ExtraMissingError("no local embedder in this test")


def indexed_workspace(runner: CliRunner) -> Settings:
    """The sample docs ingested and indexed in ./ws."""
    settings = load_settings(workspace=Path("ws"))
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=lexical_only)
        update_index(store, settings, open_embedder=lexical_only)  # conftest leaves it to `ftkit index`
    return settings


def chat(runner: CliRunner, text: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--workspace", "ws", "chat", "--model", "fake-model", *args], input=text)
    return result.exit_code, result.stdout, result.stderr


def condensations(fake: FakeOpenAI) -> list[str]:
    return [p for p in map(_last_user_text, fake.requests) if "Follow-up message:" in p]


def test_a_session_keeps_its_history_across_two_invocations(runner: CliRunner, fake: FakeOpenAI) -> None:
    settings = indexed_workspace(runner)

    first = chat(runner, f"{FIRST}\n/quit\n", "--session", "flags")
    assert condensations(fake) == []  # a first message is searched as it is
    second = chat(runner, f"{FOLLOW_UP}\n", "--session", "flags")  # the end of input ends it

    assert first[0] == second[0] == 0, first[2] + second[2]
    assert "Conversation flags — " in first[2]
    assert "Conversation flags, 2 earlier turns" in second[2]
    [prompt] = condensations(fake)
    assert f"User: {FIRST}" in prompt and f"Follow-up message: {FOLLOW_UP}" in prompt
    with Store(settings.db_path) as store:
        rows = store.db.execute("SELECT role, text, query FROM conversation_turns ORDER BY seq").fetchall()
        assert store.scalar("SELECT count(*) FROM conversations") == 1
    assert [(r["role"], r["text"]) for r in rows][::2] == [("user", FIRST), ("user", FOLLOW_UP)]
    assert rows[2]["query"] == f"{CONDENSED}\n{FOLLOW_UP}"  # what retrieval searched, the raw message kept


def test_new_starts_a_conversation_whose_first_message_is_not_condensed(
    runner: CliRunner, fake: FakeOpenAI
) -> None:
    settings = indexed_workspace(runner)
    events: list[ChatEvent] = []
    lines = iter([FIRST, "/new", FOLLOW_UP, "/quit", "never read"])

    last = run_chat(settings, lambda: next(lines, None), events.append, session="s")

    assert [type(e) for e in events] == [Started, Answered, Started, Answered]
    assert condensations(fake) == []
    with Store(settings.db_path) as store:
        assert [t.text for t in history(store, last)][::2] == [FOLLOW_UP]
        assert open_conversation(store, "s") == last  # --session s resumes the newest


def test_off_topic_is_refused_without_asking_the_model(
    runner: CliRunner, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = indexed_workspace(runner)
    monkeypatch.setenv("FTKIT_RETRIEVAL_THRESHOLD", "1.0")  # on the BM25 scale of a lexical-only index
    monkeypatch.setenv("FTKIT_RETRIEVAL_REFUSE_UNKNOWN_TERMS", "false")  # the threshold alone
    asked = len(fake.requests)

    code, out, err = chat(runner, "What will the weather be like in Paris tomorrow?\n")

    assert code == 0, err
    assert len(fake.requests) == asked
    assert "weather be like in Paris" in out  # the refusal names what it searched for
    assert "[1]" not in out and "file:" not in out
    with Store(settings.db_path) as store:
        assert store.scalar("SELECT refused FROM conversation_turns WHERE role = 'assistant'") == 1


def test_a_failed_answer_is_said_and_not_recorded(runner: CliRunner, fake: FakeOpenAI) -> None:
    settings = indexed_workspace(runner)
    fake.queue(*[Reply(status=500, content="down")] * 20)
    events: list[ChatEvent] = []
    lines = iter([FIRST])

    conversation = run_chat(settings, lambda: next(lines, None), events.append)

    assert isinstance(events[-1], NotAnswered)
    with Store(settings.db_path) as store:
        assert history(store, conversation) == []


def test_conversations_resume_by_name(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        named = open_conversation(store, "work")
        unnamed = open_conversation(store, None)
        newer = new_conversation(store, "work")

        assert open_conversation(store, "work") == newer != named
        assert re.fullmatch(r"chat-\d{8}-\d{6}", unnamed.name)
        assert history(store, newer) == []
