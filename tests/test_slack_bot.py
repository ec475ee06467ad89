"""The Slack bot end to end: signed Events API requests to the bolt app on 127.0.0.1, a fake Slack Web API and
a fake OpenAI model over real HTTP."""

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_kit.config import load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.retrieval.answer import LINK_REMOVED, grounded_answerer, open_retriever
from finetune_kit.slack.answerer import open_answerer
from finetune_kit.slack.bot import (
    FAILURE_NOTE,
    HANDLED_EVENTS,
    PLACEHOLDER,
    TIMEOUT_NOTE,
    SlackBot,
    build_app,
)
from finetune_kit.slack.records import Question
from finetune_kit.slack.server import EventServer, connect_socket_mode
from finetune_kit.slack.text import escape
from tests.conftest import REPO, SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply
from tests.fake_slack import (
    ALICE,
    BOB,
    BOT_ID,
    BOT_TOKEN,
    BOT_USER,
    OTHER_BOT_ID,
    SIGNING_SECRET,
    FakeSlack,
    FakeSocketMode,
    post_event,
)

CHANNEL = "CGENERAL1"
DM = "DALICE001"


def answer_by_echo(body: dict) -> Reply:
    """The fake model's answer names the last question it was asked."""
    return Reply(f"Answer to: {body['messages'][-1]['content']}")


@dataclass
class RunningBot:
    """A bot served on 127.0.0.1 and the fake Slack it talks to."""

    bot: SlackBot
    url: str
    slack: FakeSlack

    def deliver(self, event: dict[str, Any], **kwargs: Any) -> int:
        """Post one event as Slack does; its HTTP status."""
        return post_event(self.url, self.slack.envelope(event), **kwargs)[0]

    def settle(self) -> None:
        """Wait until every event so far is handled and every answer written."""
        assert self.bot.wait_idle(10)

    def rows(self, sql: str) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.bot.settings.db_path)) as db:
            return db.execute(sql).fetchall()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def model() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(answer_by_echo, api_key=TEST_KEY) as fake:
        yield fake


@pytest.fixture
def slack_env(monkeypatch: pytest.MonkeyPatch, slack: FakeSlack, model: FakeOpenAI) -> None:
    """Slack secrets and both fakes' URLs in the environment, as a deployment sets them."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("SLACK_API_URL", slack.url)
    monkeypatch.setenv("OPENAI_BASE_URL", model.url)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)


@pytest.fixture
def start_bot(slack_env: None, slack: FakeSlack, tmp_path: Path) -> Iterator[Callable[..., RunningBot]]:
    """Start bots (on one workspace) with the given settings; all are stopped at the end of the test."""
    with contextlib.ExitStack() as stack:

        def start(docs: bool = False, **flags: Any) -> RunningBot:
            """docs: answer from the workspace's index, as `ftkit slack --rag` does."""
            settings = load_settings(workspace=tmp_path / "ws", **flags)
            answerer = stack.enter_context(open_answerer(settings))
            grounded = stack.enter_context(grounded_answerer(settings, answerer)) if docs else None
            bot = build_app(settings, answerer, docs=grounded)
            stack.callback(bot.close)
            server = EventServer(bot.app, "127.0.0.1", 0)
            server.start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            return RunningBot(bot, server.url, slack)

        yield start


def mention(slack: FakeSlack, text: str, channel: str = CHANNEL, **kwargs: Any) -> dict[str, Any]:
    """A person mentions the bot: the message in the channel, and its app_mention event."""
    event = slack.user_says(channel, f"<@{BOT_USER}> {text}", **kwargs)
    event.pop("channel_type")
    return {**event, "type": "app_mention"}


def answers(slack: FakeSlack, channel: str = CHANNEL) -> list[str]:
    """The text of the bot's messages in a channel."""
    return [m["text"] for m in slack.bot_messages(channel)]


# --- where the bot answers --------------------------------------------------------------------------


def test_a_mention_is_answered_in_its_thread_and_recorded(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    event = mention(running.slack, "how do I change the port?")
    assert running.deliver(event) == 200
    running.settle()
    placeholder = running.slack.calls_to("chat.postMessage")[0].args
    assert placeholder == {"channel": CHANNEL, "thread_ts": event["ts"], "text": PLACEHOLDER}
    update = running.slack.calls_to("chat.update")[-1].args
    assert update["text"] == "Answer to: how do I change the port?"
    assert answers(running.slack) == ["Answer to: how do I change the port?"]
    [row] = running.rows(
        "SELECT channel, thread_ts, question, answer, model, status, latency_ms >= 0 FROM slack_answers"
    )
    assert row == (
        CHANNEL,
        event["ts"],
        "how do I change the port?",
        "Answer to: how do I change the port?",
        "gpt-4o-mini-2024-07-18",
        "answered",
        1,
    )


def test_the_model_gets_the_configured_prompt_model_and_sampling(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot(
        slack_model="ft:gpt-4o-mini:acme::abc123",
        slack_system_prompt="You answer questions about Widget.",
        slack_temperature=0.7,
        slack_max_answer_tokens=200,
        slack_stream=False,
    )
    running.deliver(mention(running.slack, "what is Widget?"))
    running.settle()
    [body] = model.requests
    assert body == {
        "model": "ft:gpt-4o-mini:acme::abc123",
        "messages": [
            {"role": "system", "content": "You answer questions about Widget."},
            {"role": "user", "content": "what is Widget?"},
        ],
        "temperature": 0.7,
        "max_tokens": 200,
    }
    assert model.invalid_requests == []


def test_the_default_system_prompt_is_the_one_the_dataset_trained_on(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot(product="Quillstack")
    running.deliver(mention(running.slack, "hi"))
    running.settle()
    assert model.requests[0]["messages"][0] == {
        "role": "system",
        "content": "You are a helpful technical support assistant for Quillstack.",
    }


def test_a_mention_also_delivered_as_a_message_event_is_answered_once(
    start_bot: Callable[..., RunningBot],
) -> None:
    running = start_bot()
    as_mention = mention(running.slack, "where are the logs?")
    as_message = {**as_mention, "type": "message", "channel_type": "channel"}
    both = [threading.Thread(target=running.deliver, args=(e,)) for e in (as_mention, as_message)]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    running.settle()
    assert answers(running.slack) == ["Answer to: where are the logs?"]
    assert running.bot.stats["duplicate_messages"] == 1


def test_a_direct_message_is_answered_without_a_mention(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    event = running.slack.user_says(DM, "can I export to PDF?", channel_type="im")
    running.deliver(event)
    running.settle()
    assert answers(running.slack, DM) == ["Answer to: can I export to PDF?"]
    assert running.slack.calls_to("chat.postMessage")[0].args["thread_ts"] == event["ts"]


def test_a_follow_up_in_the_bots_thread_is_answered_with_the_thread_as_context(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot(slack_stream=False)
    first = mention(running.slack, "how do I install it?")
    running.deliver(first)
    running.settle()
    running.deliver(running.slack.user_says(CHANNEL, "on Windows?", user=BOB, thread_ts=first["ts"]))
    running.settle()
    running.deliver(running.slack.user_says(CHANNEL, "and without admin rights?", thread_ts=first["ts"]))
    running.settle()
    assert model.requests[-1]["messages"][1:] == [
        {"role": "user", "content": "how do I install it?"},
        {"role": "assistant", "content": "Answer to: how do I install it?"},
        {"role": "user", "content": "on Windows?"},
        {"role": "assistant", "content": "Answer to: on Windows?"},
        {"role": "user", "content": "and without admin rights?"},
    ]
    assert len(answers(running.slack)) == 3
    assert all(m.get("thread_ts") == first["ts"] for m in running.slack.bot_messages(CHANNEL))


def test_a_mention_in_someone_elses_thread_reads_the_thread(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot()
    parent = running.slack.user_says(CHANNEL, "the build fails with E42", user=BOB)
    running.slack.user_says(CHANNEL, "same here", user="UCAROL001", thread_ts=parent["ts"])
    running.deliver(mention(running.slack, "any idea?", thread_ts=parent["ts"]))
    running.settle()
    assert model.requests[0]["messages"][1:] == [
        {"role": "user", "content": "the build fails with E42\n\nsame here\n\nany idea?"}
    ]
    assert running.slack.bot_messages(CHANNEL)[0]["thread_ts"] == parent["ts"]


def test_a_thread_the_bot_is_not_part_of_is_left_alone(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    parent = running.slack.user_says(CHANNEL, "lunch?")
    running.deliver(parent)
    running.deliver(running.slack.user_says(CHANNEL, "sure", user=BOB, thread_ts=parent["ts"]))
    running.settle()
    assert running.slack.calls_to("chat.postMessage") == []
    assert running.bot.stats["ignored"] == 2


def test_a_thread_with_unreadable_history_is_answered_from_the_question(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot()
    running.slack.errors["conversations.replies"] = "missing_scope"
    parent = running.slack.user_says(CHANNEL, "the build fails")
    running.deliver(mention(running.slack, "any idea?", thread_ts=parent["ts"]))
    running.settle()
    assert model.requests[0]["messages"][1:] == [{"role": "user", "content": "any idea?"}]


def test_a_long_thread_is_trimmed_to_the_context_window_keeping_the_newest(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    running = start_bot(slack_context_tokens=512, slack_max_answer_tokens=128)
    parent = running.slack.user_says(CHANNEL, "old question " + "words " * 150)
    for n in range(6):
        running.slack.user_says(CHANNEL, f"message {n} " + "more " * 40, thread_ts=parent["ts"])
    running.deliver(mention(running.slack, "so what now?", thread_ts=parent["ts"]))
    running.settle()
    [user_turn] = model.requests[0]["messages"][1:]
    assert user_turn["content"].endswith("so what now?")
    assert "old question" not in user_turn["content"]
    assert "message 5" in user_turn["content"]


# --- no loops, no doubles -----------------------------------------------------------------------------


def test_slack_retries_and_a_repeated_event_id_answer_once(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    payload = running.slack.envelope(mention(running.slack, "is there an API?"))
    statuses = [post_event(running.url, payload)[0]]
    statuses += [post_event(running.url, payload, retry_num=n)[0] for n in (1, 2)]
    statuses.append(post_event(running.url, payload)[0])  # the same event_id delivered again, no retry header
    running.settle()
    assert statuses == [200, 200, 200, 200]
    assert answers(running.slack) == ["Answer to: is there an API?"]
    assert running.bot.stats["duplicate_events"] == 3


def test_a_restarted_bot_does_not_answer_a_retry_again(start_bot: Callable[..., RunningBot]) -> None:
    first = start_bot()
    payload = first.slack.envelope(mention(first.slack, "is there an API?"))
    post_event(first.url, payload)
    first.settle()
    second = start_bot()  # the same workspace: a restart
    assert post_event(second.url, payload, retry_num=1)[0] == 200
    second.settle()
    assert len(answers(first.slack)) == 1


def test_a_restarted_bot_answers_what_it_left_pending(start_bot: Callable[..., RunningBot]) -> None:
    first = start_bot()
    question_ts = mention(first.slack, "still there?")["ts"]
    claimed = first.bot.records.claim(Question(CHANNEL, question_ts, question_ts, ALICE, "still there?"))
    assert claimed is not None  # claimed, then the process died before posting anything
    second = start_bot()
    assert second.bot.resume_pending() == 1
    second.settle()
    assert answers(first.slack) == ["Answer to: still there?"]
    assert second.rows("SELECT question_ts, status FROM slack_answers") == [(question_ts, "answered")]


def test_a_restarted_bot_finishes_an_answer_it_was_writing(start_bot: Callable[..., RunningBot]) -> None:
    first = start_bot()
    question_ts = mention(first.slack, "still there?")["ts"]
    answer_id = first.bot.records.claim(Question(CHANNEL, question_ts, question_ts, ALICE, "still there?"))
    assert answer_id is not None
    placeholder = first.slack._chat_postMessage(
        {"channel": CHANNEL, "thread_ts": question_ts, "text": PLACEHOLDER}
    )
    first.bot.records.set_placeholder(answer_id, placeholder["ts"])  # then the process was killed
    second = start_bot()
    assert second.bot.resume_pending() == 1
    second.settle()
    assert first.slack.calls_to("chat.postMessage") == []  # the old placeholder is reused
    assert first.slack.message(CHANNEL, placeholder["ts"])["text"] == "Answer to: still there?"


def test_a_channel_the_bot_cannot_post_in_is_recorded_not_fatal(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    running.slack.errors["chat.postMessage"] = "not_in_channel"
    running.deliver(mention(running.slack, "hello?"))
    running.settle()
    assert running.rows("SELECT status, error FROM slack_answers") == [("failed", "slack: not_in_channel")]
    del running.slack.errors["chat.postMessage"]
    running.deliver(mention(running.slack, "and now?"))
    running.settle()
    assert answers(running.slack) == ["Answer to: and now?"]


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({"user": BOT_USER, "bot_id": BOT_ID, "text": "Answer to: x"}, id="own-message"),
        pytest.param(
            {"subtype": "bot_message", "bot_id": OTHER_BOT_ID, "text": f"<@{BOT_USER}> ping"}, id="other-bot"
        ),
        pytest.param(
            {"user": ALICE, "bot_id": OTHER_BOT_ID, "text": f"<@{BOT_USER}> ping"}, id="bot-as-user"
        ),
        pytest.param(
            {
                "subtype": "message_changed",
                "hidden": True,
                "message": {"user": BOT_USER, "bot_id": BOT_ID, "text": "Answer to: x", "ts": "1.1"},
                "previous_message": {"user": BOT_USER, "bot_id": BOT_ID, "text": PLACEHOLDER, "ts": "1.1"},
            },
            id="own-edit",
        ),
        pytest.param(
            {"subtype": "message_changed", "message": {"user": ALICE, "text": f"<@{BOT_USER}> edited"}},
            id="edit-by-a-person",
        ),
        pytest.param({"subtype": "message_deleted", "deleted_ts": "1.1"}, id="deletion"),
        pytest.param({"subtype": "channel_join", "user": BOB, "text": "<@UBOB00001> has joined"}, id="join"),
    ],
)
def test_the_bot_ignores_its_own_messages_other_bots_and_edits(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, event: dict[str, Any]
) -> None:
    running = start_bot()
    first = mention(running.slack, "hello?")
    running.deliver(first)
    running.settle()
    ts = running.slack.next_ts()
    in_thread = {"type": "message", "channel": CHANNEL, "channel_type": "channel", "ts": ts, "event_ts": ts}
    assert running.deliver({**in_thread, "thread_ts": first["ts"], **event}) == 200
    running.settle()
    assert len(model.requests) == 1
    assert len(running.slack.calls_to("chat.postMessage")) == 1


# --- errors become one short message -------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 400, 401])
def test_a_model_failure_becomes_one_short_message(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, status: int
) -> None:
    model.responder = lambda body: Reply("The server had an error.", status=status)
    running = start_bot()
    running.deliver(mention(running.slack, "does it scale?"))
    running.settle()
    assert answers(running.slack) == [FAILURE_NOTE]
    assert len(running.slack.calls_to("chat.postMessage")) == 1
    [(state, error)] = running.rows("SELECT status, error FROM slack_answers")
    assert (state, error) == ("failed", f"HTTP {status}: The server had an error.")
    assert running.rows("SELECT COUNT(*) FROM slack_replies") == [(0,)]  # a note collects no feedback


def test_a_key_the_model_server_echoes_is_not_stored(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    model.queue(Reply(f"Incorrect API key provided: {TEST_KEY}.", status=401))
    running = start_bot()
    running.deliver(mention(running.slack, "hi"))
    running.settle()
    assert running.rows("SELECT error FROM slack_answers") == [
        ("HTTP 401: Incorrect API key provided: ***.",)
    ]


def test_a_transient_model_error_is_retried_once(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    model.queue(Reply("busy", status=503))
    running = start_bot()
    running.deliver(mention(running.slack, "still there?"))
    running.settle()
    assert answers(running.slack) == ["Answer to: still there?"]
    assert len(model.requests) == 2


@pytest.mark.parametrize("stream", [True, False])
def test_a_model_timeout_becomes_one_short_message(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, stream: bool
) -> None:
    model.queue(Reply("too late", delay_s=5))
    running = start_bot(slack_timeout_s=0.3, slack_stream=stream)
    running.deliver(mention(running.slack, "are you there?"))
    running.settle()
    assert answers(running.slack) == [TIMEOUT_NOTE]
    assert running.rows("SELECT status, error FROM slack_answers") == [("failed", "no answer within 0.3 s")]


def test_an_empty_answer_is_a_failure(start_bot: Callable[..., RunningBot], model: FakeOpenAI) -> None:
    model.queue(Reply("  "))
    running = start_bot()
    running.deliver(mention(running.slack, "?"))
    running.settle()
    assert answers(running.slack) == [FAILURE_NOTE]


# --- long answers, streaming --------------------------------------------------------------------------


def test_a_long_answer_is_split_below_slacks_limit(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    paragraphs = [f"Step {n}: " + " ".join(["configure the widget carefully"] * 30) for n in range(1, 13)]
    model.queue(Reply("\n\n".join(paragraphs)))
    running = start_bot()
    running.deliver(mention(running.slack, "walk me through setup"))
    running.settle()
    parts = answers(running.slack)
    assert len(parts) == 3
    assert all(len(part) <= 3900 for part in parts)
    assert "\n\n".join(parts).split("\n\n") == paragraphs
    assert len(running.rows("SELECT ts FROM slack_replies")) == 3


@pytest.mark.parametrize(("interval_s", "previews"), [(0.05, True), (30.0, False)])
def test_a_streamed_answer_is_previewed_at_the_update_interval_then_replaced_whole(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, interval_s: float, previews: bool
) -> None:
    model.queue(Reply("Set the port with --port in the config file.", delay_s=0.3))  # streams after 0.3 s
    running = start_bot(slack_stream=True, slack_update_interval_s=interval_s)
    running.deliver(mention(running.slack, "port?"))
    running.settle()
    assert model.requests[0]["stream"] is True
    updates = [call.args["text"] for call in running.slack.calls_to("chat.update")]
    assert updates[-1] == "Set the port with --port in the config file."
    assert all(u.endswith(" …") and updates[-1].startswith(u[:-2]) for u in updates[:-1])
    assert bool(updates[:-1]) is previews


@pytest.mark.parametrize("stream", [True, False])
def test_streaming_can_be_turned_off(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, stream: bool
) -> None:
    running = start_bot(slack_stream=stream)
    running.deliver(mention(running.slack, "stream please"))
    running.settle()
    assert model.requests[0].get("stream", False) is stream
    assert answers(running.slack) == ["Answer to: stream please"]


# --- who the bot answers ---------------------------------------------------------------------------------


def test_the_allow_list_limits_the_channels(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot(slack_allowed_channels=["CALLOWED1"])
    running.deliver(mention(running.slack, "here?", channel="CALLOWED1"))
    running.deliver(mention(running.slack, "and here?", channel="CELSEWHERE"))
    running.deliver(running.slack.user_says(DM, "and in a DM?", channel_type="im"))
    running.settle()
    assert answers(running.slack, "CALLOWED1") == ["Answer to: here?"]
    assert answers(running.slack, "CELSEWHERE") == []
    assert answers(running.slack, DM) == ["Answer to: and in a DM?"]


def test_direct_messages_can_be_turned_off(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot(slack_answer_dms=False)
    running.deliver(running.slack.user_says(DM, "hello?", channel_type="im"))
    running.settle()
    assert running.slack.calls_to("chat.postMessage") == []


# --- feedback ----------------------------------------------------------------------------------------


def reaction(kind: str, user: str, name: str, channel: str, ts: str) -> dict[str, Any]:
    item = {"type": "message", "channel": channel, "ts": ts}
    return {"type": kind, "user": user, "reaction": name, "item": item, "item_user": BOT_USER, "event_ts": ts}


def test_thumbs_on_the_bots_answers_are_recorded_as_feedback(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    question = mention(running.slack, "how fast is it?")
    running.deliver(question)
    running.settle()
    [answer] = running.slack.bot_messages(CHANNEL)
    running.deliver(reaction("reaction_added", ALICE, "+1", CHANNEL, answer["ts"]))
    running.deliver(reaction("reaction_added", BOB, "-1::skin-tone-3", CHANNEL, answer["ts"]))
    running.deliver(reaction("reaction_added", BOB, "tada", CHANNEL, answer["ts"]))  # not a rating
    running.deliver(reaction("reaction_added", BOB, "+1", CHANNEL, question["ts"]))  # not the bot's answer
    running.deliver(reaction("reaction_added", BOT_USER, "+1", CHANNEL, answer["ts"]))  # the bot itself
    running.settle()
    feedback = "SELECT a.question, f.user_id, f.reaction, f.rating FROM slack_feedback f JOIN slack_answers a ON a.id = f.answer_id ORDER BY f.user_id"
    assert running.rows(feedback) == [("how fast is it?", ALICE, "+1", 1), ("how fast is it?", BOB, "-1", -1)]
    running.deliver(reaction("reaction_removed", BOB, "-1", CHANNEL, answer["ts"]))
    running.settle()
    assert running.rows(feedback) == [("how fast is it?", ALICE, "+1", 1)]


# --- answers from the docs (ftkit slack --rag) ------------------------------------------------------------

FOREIGN_URL = "https://sdk-keys.example.net/rotate"


def cite_one_and_nine(body: dict) -> Reply:
    """The fake model cites source [1], a source [9] it was never given, and pastes a foreign URL."""
    return Reply(f"Rotate it from the dashboard [1][9]. More at {FOREIGN_URL}")


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample docs ingested and indexed once for this module (indexing embeds every chunk)."""
    from typer.testing import CliRunner

    from finetune_kit.cli import app

    workspace = tmp_path_factory.mktemp("sample-index") / "ws"
    for args in (["ingest", str(SAMPLE_DOCS)], ["index"]):
        result = CliRunner().invoke(app, ["-w", str(workspace), *args])
        assert result.exit_code == 0, result.output
    return workspace


@pytest.fixture
def indexed(sample_index: Path, tmp_path: Path) -> Path:
    """A copy of the indexed sample workspace, where the bot runs."""
    shutil.copytree(sample_index, tmp_path / "ws")
    return tmp_path / "ws"


def retrieved_ids(running: RunningBot, query: str) -> list[str]:
    with open_retriever(running.bot.settings) as retriever:
        return [hit.chunk_id for hit in retriever.search(query)]


def test_a_grounded_answer_links_only_the_cited_retrieved_sources_and_records_the_chunks(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, indexed: Path
) -> None:
    model.responder = cite_one_and_nine
    running = start_bot(docs=True, slack_stream=False)
    running.deliver(mention(running.slack, "How do I rotate an SDK key?"))
    running.settle()
    [posted] = answers(running.slack)
    expected = retrieved_ids(running, "How do I rotate an SDK key?")
    with open_retriever(running.bot.settings) as retriever:
        first = retriever.search("How do I rotate an SDK key?")[0]
    assert posted.startswith(f"Rotate it from the dashboard [1]. More at {LINK_REMOVED}\n\n*Sources*\n")
    assert posted.endswith(
        f"[1] <{first.url}|{first.title}>"
        + (f" — {escape(first.heading)}" if first.heading != first.title else "")
    )
    assert FOREIGN_URL not in posted and "[9]" not in posted and posted.count("<") == 1
    rows = running.rows("SELECT c.chunk_id, c.cited FROM slack_answer_chunks c ORDER BY c.rank")
    assert rows == [(chunk_id, int(rank == 0)) for rank, chunk_id in enumerate(expected)]
    assert running.rows("SELECT query, refused, status FROM slack_answers") == [
        ("How do I rotate an SDK key?", 0, "answered")
    ]


def test_feedback_on_a_grounded_answer_joins_to_its_chunks(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, indexed: Path
) -> None:
    model.responder = cite_one_and_nine
    running = start_bot(docs=True, slack_stream=False)
    running.deliver(mention(running.slack, "How do I rotate an SDK key?"))
    running.settle()
    [answer] = running.slack.bot_messages(CHANNEL)
    running.deliver(reaction("reaction_added", BOB, "-1", CHANNEL, answer["ts"]))
    running.settle()
    traced = running.rows(
        "SELECT f.rating, c.chunk_id, c.cited FROM slack_feedback f JOIN slack_answer_chunks c USING (answer_id)"
        " JOIN chunks ON chunks.id = c.chunk_id ORDER BY c.rank"
    )
    expected = retrieved_ids(running, "How do I rotate an SDK key?")
    assert traced == [(-1, chunk_id, int(rank == 0)) for rank, chunk_id in enumerate(expected)]


def test_an_off_topic_question_is_refused_without_asking_the_model(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, indexed: Path
) -> None:
    running = start_bot(docs=True, retrieval_threshold=0.99, retrieval_refuse_unknown_terms=False)
    running.deliver(mention(running.slack, "What is the best recipe for sourdough bread?"))
    running.settle()
    assert model.requests == []
    [posted] = answers(running.slack)
    assert (
        posted.startswith("I found nothing in the documentation of the product that answers")
        and "<" not in posted
    )
    assert running.rows("SELECT refused, status FROM slack_answers") == [(1, "answered")]
    assert running.rows("SELECT SUM(cited) FROM slack_answer_chunks") == [(0,)]


def test_a_grounded_follow_up_gets_the_thread_as_history(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, indexed: Path
) -> None:
    model.responder = lambda body: Reply(f"Like this [1]. ({len(body['messages'])} messages)")
    running = start_bot(docs=True, slack_stream=False)
    first = mention(running.slack, "How do I rotate an SDK key?")
    running.deliver(first)
    running.settle()
    running.deliver(running.slack.user_says(CHANNEL, "and a server key?", thread_ts=first["ts"]))
    running.settle()
    messages = model.requests[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "How do I rotate an SDK key?"
    assert messages[2]["content"].startswith("Like this [1]. (2 messages)")
    assert messages[3]["content"] == "and a server key?"
    assert messages[0]["content"].startswith("You are a helpful technical support assistant for the product.")


def test_slack_rag_without_an_index_is_one_line_before_any_model_starts(
    slack_env: None, slack: FakeSlack, model: FakeOpenAI, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from finetune_kit.cli import app

    result = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "slack", "--rag"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "run `ftkit index`" in result.stderr
    assert model.requests == [] and slack.calls == []


# --- requests Slack did not sign -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        {"secret": None},
        {"secret": "not-the-signing-secret"},
        {"timestamp": time.time() - 6 * 60},
        {"body": '{"type": "event_callback", "event": {"type": "app_mention", "text": "tampered"}}'},
    ],
    ids=["unsigned", "wrong-secret", "six-minutes-old", "tampered-body"],
)
def test_requests_not_signed_by_slack_get_401(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI, how: dict[str, Any]
) -> None:
    running = start_bot()
    status, _, _ = post_event(running.url, running.slack.envelope(mention(running.slack, "hi")), **how)
    assert status == 401
    running.settle()
    assert running.slack.calls_to("chat.postMessage") == []
    assert model.requests == []


def test_url_verification_is_answered_with_the_challenge(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    challenge = {
        "token": "x",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
        "type": "url_verification",
    }
    status, body, _ = post_event(running.url, challenge)
    assert status == 200
    assert "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in body


# --- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SLACK_BOT_TOKEN": None},
            "SLACK_BOT_TOKEN is not set — create the app from slack-app-manifest.yaml (README: Slack bot), "
            "install it and export its Bot User OAuth Token (xoxb-…)",
        ),
        (
            {"SLACK_BOT_TOKEN": "xoxp-user-token"},
            "SLACK_BOT_TOKEN is not a bot token — export the Bot User OAuth Token (xoxb-…)",
        ),
        (
            {"SLACK_SIGNING_SECRET": None},
            "SLACK_SIGNING_SECRET is not set — export the Signing Secret from the app's Basic Information page "
            "(HTTP mode), or SLACK_APP_TOKEN (xapp-…) for Socket Mode",
        ),
        (
            {"SLACK_APP_TOKEN": "xoxb-wrong-kind"},
            "SLACK_APP_TOKEN is not an app-level token — create one (xapp-…) with connections:write under Basic Information",
        ),
        (
            {"SLACK_BOT_TOKEN": "xoxb-revoked"},
            "Slack rejected SLACK_BOT_TOKEN (invalid_auth) — reinstall the app and export its current Bot User OAuth Token",
        ),
    ],
    ids=["no-bot-token", "user-token", "no-signing-secret", "bad-app-token", "revoked-token"],
)
def test_missing_or_wrong_slack_credentials_are_one_line_errors(
    slack_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str | None], message: str
) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    settings = load_settings(workspace=tmp_path)
    with open_answerer(settings) as answerer, pytest.raises(ConfigError) as raised:
        build_app(settings, answerer)
    assert str(raised.value) == message


def test_cli_reports_a_missing_token_and_never_prints_secrets(
    slack_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from finetune_kit.cli import app

    monkeypatch.delenv("SLACK_SIGNING_SECRET")
    result = CliRunner().invoke(app, ["slack", "--port", "0"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: SLACK_SIGNING_SECRET is not set")
    assert BOT_TOKEN not in result.output


def test_cli_reports_a_port_in_use(slack_env: None, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from finetune_kit.cli import app

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["-w", str(tmp_path), "slack", "--host", "127.0.0.1", "--port", str(port)]
        )
    assert result.exit_code == 1
    assert result.output == (
        f"Error: cannot listen on 127.0.0.1:{port} (Address already in use) — pick another --port or --host\n"
    )


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "FTKIT_SLACK_BOT_TOKEN",
            "FTKIT_SLACK_BOT_TOKEN is not read — secrets come from SLACK_BOT_TOKEN only; export that instead",
        ),
        (
            "toml",
            "slack_signing_secret cannot be set in ftkit.toml or FTKIT_* — secrets are read from SLACK_SIGNING_SECRET only",
        ),
    ],
)
def test_slack_secrets_come_from_their_own_variables_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str, message: str
) -> None:
    if where == "toml":
        (tmp_path / "ftkit.toml").write_text('slack_signing_secret = "abc"\n')
    else:
        monkeypatch.setenv(where, "xoxb-1")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == message


def test_the_allow_list_takes_channel_ids_not_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(slack_allowed_channels=["#general"])
    assert "'#general' is not a channel ID — copy the ID (C…) from the channel's details in Slack" in str(
        raised.value
    )


def test_secrets_never_reach_the_state_database(start_bot: Callable[..., RunningBot]) -> None:
    running = start_bot()
    running.deliver(mention(running.slack, "hi"))
    running.settle()
    data = (
        running.bot.settings.db_path.read_bytes() + Path(f"{running.bot.settings.db_path}-wal").read_bytes()
    )
    for secret in (BOT_TOKEN, SIGNING_SECRET, TEST_KEY):
        assert secret.encode() not in data


def test_the_manifest_asks_for_exactly_the_events_the_bot_handles_and_the_scopes_they_need() -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "slack-app-manifest.yaml").read_text())
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    assert {event.split(".")[0] for event in events} == set(HANDLED_EVENTS)
    assert sorted(manifest["oauth_config"]["scopes"]["bot"]) == [
        "app_mentions:read",  # app_mention
        "channels:history",  # message.channels, conversations.replies in public channels
        "chat:write",  # chat.postMessage, chat.update
        "groups:history",  # message.groups, conversations.replies in private channels
        "im:history",  # message.im, conversations.replies in DMs
        "reactions:read",  # reaction_added, reaction_removed
    ]
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True  # people can DM the bot


# --- the command, as a process ------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


@contextlib.contextmanager
def ftkit_slack(tmp_path: Path, *args: str) -> Iterator[str]:
    """`ftkit slack` in its own process, and the line it prints when ready; stopped with Ctrl-C (SIGINT)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune_kit", "-w", str(tmp_path / "ws"), "slack", "--no-stream", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as in a terminal: a shell's background job (`cmd &`) passes SIGINT on ignored, and Python then
        # never turns it into KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    try:
        yield process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert stdout == "Stopped. Questions left unanswered are answered at the next start.\n"
    assert BOT_TOKEN not in stderr


def test_ftkit_slack_serves_http_until_stopped(slack_env: None, slack: FakeSlack, tmp_path: Path) -> None:
    with ftkit_slack(tmp_path, "--host", "127.0.0.1", "--port", "0") as line:
        assert line.startswith("Listening for Slack events at http://127.0.0.1:")
        assert line.endswith("/slack/events, answering with gpt-4o-mini-2024-07-18. Ctrl-C stops.\n")
        url = line.split(" at ")[1].split(",")[0]
        assert post_event(url, slack.envelope(mention(slack, "are you up?")))[0] == 200
        wait_until(lambda: answers(slack) == ["Answer to: are you up?"])


def test_ftkit_slack_in_socket_mode_answers_over_the_websocket(
    slack_env: None, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app_token = "xapp-1-test-0123456789"
    monkeypatch.setenv("SLACK_APP_TOKEN", app_token)
    monkeypatch.delenv("SLACK_SIGNING_SECRET")  # Socket Mode needs no signing secret
    slack.app_token = app_token
    with FakeSocketMode() as socket_mode:
        slack.socket_url = socket_mode.url
        with ftkit_slack(tmp_path) as line:
            assert (
                line
                == "Connected to Slack in Socket Mode, answering with gpt-4o-mini-2024-07-18. Ctrl-C stops.\n"
            )
            payload = slack.envelope(mention(slack, "over the socket?"))
            assert socket_mode.wait_for_ack(socket_mode.push(payload))
            assert socket_mode.wait_for_ack(socket_mode.push(payload, retry_attempt=1))
            wait_until(lambda: answers(slack) == ["Answer to: over the socket?"])
    assert len(slack.calls_to("apps.connections.open")) == 1
    assert answers(slack) == ["Answer to: over the socket?"]


def test_a_refused_socket_mode_connection_is_a_one_line_error(
    start_bot: Callable[..., RunningBot], slack: FakeSlack
) -> None:
    running = start_bot()
    slack.app_token = "xapp-1-test-0123456789"
    with pytest.raises(ConfigError) as raised:
        connect_socket_mode(running.bot.app, "xapp-1-test-0123456789")
    assert str(raised.value) == (
        "Slack refused a Socket Mode connection (not_allowed_token_type) — enable Socket Mode in the app's settings "
        "and check SLACK_APP_TOKEN"
    )


# --- under load -------------------------------------------------------------------------------------


class ConcurrencyProbe:
    """A slow fake model that counts how many of its calls overlap."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.now, self.peak = seconds, 0, 0
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.seconds)
        with self._lock:
            self.now -= 1
        return answer_by_echo(body)


def test_fifty_concurrent_mentions_get_fifty_answers_within_the_model_concurrency(
    start_bot: Callable[..., RunningBot], model: FakeOpenAI
) -> None:
    probe = ConcurrencyProbe(seconds=0.05)
    model.responder = probe
    running = start_bot(slack_concurrency=4)
    events = [mention(running.slack, f"question {n}") for n in range(50)]
    statuses: list[int] = []
    senders = [threading.Thread(target=lambda e=e: statuses.append(running.deliver(e))) for e in events]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    running.settle()
    assert statuses == [200] * 50
    bot_messages = running.slack.bot_messages(CHANNEL)
    assert sorted(m["thread_ts"] for m in bot_messages) == sorted(e["ts"] for e in events)
    assert sorted(m["text"] for m in bot_messages) == sorted(f"Answer to: question {n}" for n in range(50))
    assert len(model.requests) == 50
    assert 2 <= probe.peak <= 4  # bounded by the setting, and used
    assert running.rows("SELECT status, COUNT(*) FROM slack_answers GROUP BY status") == [("answered", 50)]


# --- the real embedded model ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_model_answers_a_mention_and_its_follow_up_streaming(
    monkeypatch: pytest.MonkeyPatch, slack: FakeSlack, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("SLACK_API_URL", slack.url)
    settings = load_settings(workspace=tmp_path / "ws", product="Quillstack", slack_max_answer_tokens=96)
    with open_answerer(settings) as answerer:
        bot = build_app(settings, answerer)
        server = EventServer(bot.app, "127.0.0.1", 0)
        server.start()
        running = RunningBot(bot, server.url, slack)
        try:
            first = mention(slack, "How do I install Quillstack?")
            running.deliver(first)
            assert bot.wait_idle(300)
            running.deliver(slack.user_says(CHANNEL, "And on Windows?", thread_ts=first["ts"]))
            assert bot.wait_idle(300)
        finally:
            server.shutdown()
            server.server_close()
            bot.close()
    rows = running.rows("SELECT question, status, model, length(answer) > 0 FROM slack_answers ORDER BY id")
    assert rows == [
        ("How do I install Quillstack?", "answered", "smollm2-135m-instruct", 1),
        ("And on Windows?", "answered", "smollm2-135m-instruct", 1),
    ]
    assert all(text not in (PLACEHOLDER, FAILURE_NOTE, TIMEOUT_NOTE) for text in answers(slack))
