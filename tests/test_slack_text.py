"""The Slack bot's pure parts: message text both ways, splitting, trimming to the context, preview pacing."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from slack_sdk import WebClient

from finetune_kit.config import load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.llm.client import Endpoint
from finetune_kit.slack.answerer import OpenAIAnswerer, Turn, bot_model, context_tokens, fit_to_context
from finetune_kit.slack.preview import StreamPreview
from finetune_kit.slack.records import BotRecords
from finetune_kit.slack.text import mentions, slack_to_plain, split_message, to_mrkdwn
from finetune_kit.tokens import count_tokens
from tests.fake_slack import BOT_TOKEN, BOT_USER, FakeSlack


@pytest.mark.parametrize(
    ("slack", "plain"),
    [
        (f"<@{BOT_USER}> how do I reset?", "how do I reset?"),
        (f"<@{BOT_USER}>   ask <@UALICE001|alice>", "ask @alice"),
        ("see <#CGENERAL1|general> and <@UBOB00001>", "see #general and @UBOB00001"),
        (
            "read <https://docs.example.com/a?b=1&amp;c=2|the docs>",
            "read the docs (https://docs.example.com/a?b=1&c=2)",
        ),
        ("<https://example.com>", "https://example.com"),
        ("<!here> is 1 &lt; 2 &amp;&amp; 3 &gt; 2?", "@here is 1 < 2 && 3 > 2?"),
        (f"<@{BOT_USER}>", ""),
    ],
)
def test_slack_text_reads_as_plain_text(slack: str, plain: str) -> None:
    assert slack_to_plain(slack, BOT_USER) == plain


def test_a_mention_is_found_by_user_id() -> None:
    assert mentions(f"hey <@{BOT_USER}> there", BOT_USER)
    assert mentions(f"<@{BOT_USER}|ftkit>", BOT_USER)
    assert not mentions("hey <@UOTHER001>", BOT_USER)


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("Use **--port** and *not* ~~--host~~.", "Use *--port* and _not_ ~--host~."),
        (
            "See [the docs](https://example.com/x?a=1&b=2).",
            "See <https://example.com/x?a=1&amp;b=2|the docs>.",
        ),
        ("## Install\n- one\n* two", "*Install*\n• one\n• two"),
        ("Tell <!channel> that a < b & c", "Tell &lt;!channel&gt; that a &lt; b &amp; c"),
        ("Run `a **b** <c>` now", "Run `a **b** &lt;c&gt;` now"),
        ("```python\nif a < b:\n    **x**\n```", "```\nif a &lt; b:\n    **x**\n```"),
        ("```\nunclosed", "```\nunclosed\n```"),
    ],
)
def test_markdown_becomes_slack_mrkdwn(markdown: str, mrkdwn: str) -> None:
    assert to_mrkdwn(markdown) == mrkdwn


def test_a_short_message_is_one_part() -> None:
    assert split_message("hello", limit=100) == ["hello"]


def test_a_long_message_is_cut_at_paragraphs_then_lines_then_words() -> None:
    text = "\n\n".join(["alpha " * 10, "beta " * 10, "gamma " * 10]).replace(" \n", "\n").strip()
    parts = split_message(text, limit=80)
    assert parts == ["alpha " * 9 + "alpha", "beta " * 9 + "beta", "gamma " * 9 + "gamma"]
    words = split_message("word " * 100, limit=60)
    assert all(len(p) <= 60 for p in words)
    assert " ".join(words).split() == ["word"] * 100


def test_a_cut_inside_a_code_block_closes_and_reopens_the_fence() -> None:
    code = "```\n" + "\n".join(f"line {n}" for n in range(40)) + "\n```"
    parts = split_message(code, limit=120)
    assert len(parts) > 1
    assert all(part.startswith("```") and part.endswith("```") and len(part) <= 120 for part in parts)


def test_a_cut_never_splits_an_escape() -> None:
    parts = split_message("&amp;" * 50, limit=42)
    assert all(part.count("&") == part.count(";") for part in parts)
    assert "".join(parts) == "&amp;" * 50


def test_trimming_keeps_the_system_prompt_the_question_and_the_newest_turns() -> None:
    turns = [Turn("user", f"old {n} " + "word " * 50) for n in range(10)] + [Turn("user", "the question")]
    messages = fit_to_context("Be brief.", turns, budget_tokens=200)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    [user] = messages[1:]
    assert user["content"].endswith("the question")
    assert "old 9" in user["content"] and "old 0" not in user["content"]
    assert sum(count_tokens(m["content"]) + 4 for m in messages) <= 200


def test_a_question_longer_than_the_context_is_cut() -> None:
    messages = fit_to_context("S", [Turn("user", "word " * 1000)], budget_tokens=100)
    assert count_tokens(messages[1]["content"]) <= 100


def test_the_conversation_opens_with_the_user_and_alternates() -> None:
    turns = [
        Turn("assistant", "a1"),
        Turn("user", "u1"),
        Turn("user", "u2"),
        Turn("assistant", "a2"),
        Turn("user", "q"),
    ]
    assert [m["role"] for m in fit_to_context("S", turns, 1000)] == ["system", "user", "assistant", "user"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


def test_a_streaming_preview_updates_at_most_once_per_interval(slack: FakeSlack) -> None:
    placeholder = slack._chat_postMessage({"channel": "C1", "text": "…"})["ts"]
    clock = Clock()
    preview = StreamPreview(WebClient(token=BOT_TOKEN, base_url=slack.url), "C1", placeholder, 1.0, clock)
    for at, text in [
        (0.2, "a"),
        (0.9, "a b"),
        (1.0, "a b c"),
        (1.5, "a b c d"),
        (2.1, "a b c d e"),
        (2.2, "x"),
    ]:
        clock.now = at
        preview(text)
    assert [call.args["text"] for call in slack.calls_to("chat.update")] == ["a b c …", "a b c d e …"]
    assert preview.updates == 2


def test_event_ids_are_remembered_for_a_day(tmp_path: Path) -> None:
    records = BotRecords(tmp_path / "state.db")
    assert records.first_delivery("Ev1", "app_mention")
    assert not records.first_delivery("Ev1", "app_mention")
    assert records.forget_old_events(datetime.now(UTC) + timedelta(hours=23)) == 0
    assert records.forget_old_events(datetime.now(UTC) + timedelta(hours=25)) == 1
    assert records.first_delivery("Ev1", "app_mention")
    records.close()


@pytest.mark.parametrize(
    ("flags", "window"),
    [
        ({"provider": "local"}, 2048),
        ({"provider": "local", "local_context_tokens": 4096}, 4096),
        ({"provider": "openai"}, 16_384),
        ({"provider": "openai", "slack_context_tokens": 128_000}, 128_000),
    ],
)
def test_the_context_window_follows_the_model(flags: dict, window: int) -> None:
    assert context_tokens(load_settings(**flags)) == window


@pytest.mark.parametrize(
    ("flags", "model"),
    [
        ({"provider": "local"}, "smollm2-135m-instruct"),
        ({"provider": "openai"}, "gpt-4o-mini-2024-07-18"),
        (
            {"provider": "openai", "model": "gpt-4.1", "base_model": "gpt-4.1-mini-2025-04-14"},
            "gpt-4.1-mini-2025-04-14",
        ),
        (
            {"provider": "openai", "model": "gpt-4.1", "slack_model": "ft:gpt-4o-mini:acme::x1"},
            "ft:gpt-4o-mini:acme::x1",
        ),
    ],
)
def test_the_bot_answers_with_its_pinned_model_else_the_base_model_not_the_generation_model(
    flags: dict, model: str
) -> None:
    assert bot_model(load_settings(**flags)) == model


def test_an_answer_budget_that_leaves_no_room_for_the_question_is_a_config_error() -> None:
    settings = load_settings(provider="local", slack_max_answer_tokens=2000)
    endpoint = Endpoint(base_url="http://127.0.0.1:9/v1", api_key="x", model="m", identity="local:test")
    with pytest.raises(ConfigError) as raised:
        OpenAIAnswerer.from_settings(endpoint, settings)
    assert str(raised.value) == (
        "slack_max_answer_tokens (2000) leaves no room for the question in a 2048-token context — "
        "lower slack_max_answer_tokens or raise slack_context_tokens"
    )
