"""A Slack thread as a conversation: who said what, up to the question, in the model's terms."""

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from finetune_kit.slack.answerer import Turn
from finetune_kit.slack.records import Question
from finetune_kit.slack.text import slack_to_plain

log = logging.getLogger(__name__)

ANSWERED_SUBTYPES = (None, "file_share", "thread_broadcast")  # a person wrote it; edits, joins, bots are not
MAX_THREAD_PAGES = 5  # 1,000 messages: far more than any context window holds


@dataclass(frozen=True)
class BotIdentity:
    """Who the bot is in this workspace (from auth.test)."""

    user_id: str
    bot_id: str


def fetch_thread(client: WebClient, channel: str, thread_ts: str) -> list[dict[str, Any]]:
    """Every message of a thread, oldest first (conversations.replies, following its cursor)."""
    messages: list[dict[str, Any]] = []
    cursor = None
    for _ in range(MAX_THREAD_PAGES):
        page = client.conversations_replies(channel=channel, ts=thread_ts, limit=200, cursor=cursor)
        messages.extend(page.get("messages") or [])
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not page.get("has_more") or not cursor:
            break
    return messages


def conversation(
    client: WebClient, question: Question, bot: BotIdentity, not_answers: set[str]
) -> list[Turn]:
    """The thread up to the question as turns; the question alone when the history cannot be read."""
    alone = [Turn("user", question.text)]
    if question.thread_ts == question.ts:
        return alone
    try:
        messages = fetch_thread(client, question.channel, question.thread_ts)
    except SlackApiError as exc:
        log.warning(
            "cannot read thread %s (%s); answering without history",
            question.thread_ts,
            exc.response.get("error"),
        )
        return alone
    turns = to_turns(messages, question, bot, not_answers)
    return turns if turns and turns[-1].role == "user" else [*turns, *alone]


def to_turns(
    messages: list[dict[str, Any]], question: Question, bot: BotIdentity, not_answers: set[str]
) -> list[Turn]:
    """Thread messages up to and including the question, one turn each."""
    turns: list[Turn] = []
    for message in sorted(messages, key=lambda m: Decimal(m.get("ts", "0"))):
        if Decimal(message.get("ts", "0")) > Decimal(question.ts):
            break
        role = _role(message, bot, not_answers)
        text = (
            question.text
            if message.get("ts") == question.ts
            else slack_to_plain(message.get("text") or "", bot.user_id)
        )
        if role is not None and text:
            turns.append(Turn(role, text))
    return turns


def _role(
    message: dict[str, Any], bot: BotIdentity, not_answers: set[str]
) -> Literal["user", "assistant"] | None:
    """assistant for the bot's answers, user for people; None for anything else (other bots, placeholders)."""
    if message.get("user") == bot.user_id or message.get("bot_id") == bot.bot_id:
        return None if message.get("ts") in not_answers else "assistant"
    if message.get("bot_id") or message.get("subtype") not in ANSWERED_SUBTYPES:
        return None
    return "user"
