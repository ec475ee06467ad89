"""`ftkit chat`: a conversation with the docs, like `ftkit ask --rag` with memory kept in the state DB.

The loop reads lines and shows events through callables, so it runs the same under a terminal and in a test.
Each message is answered from the retrieved chunks, after its thread's history (a follow-up is condensed into
a standalone question before retrieval); `/new` starts a new conversation, `/quit` or end of input ends it.
"""

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.errors import AnswerFailed, VagueQueryError
from finetune_kit.slack.answerer import Turn
from finetune_kit.store import Store, utc_now

log = logging.getLogger(__name__)

NEW, QUIT = "/new", "/quit"
MAX_HISTORY_TURNS = 20  # the turns loaded for a follow-up; the condensation and the answer see fewer still


@dataclass(frozen=True)
class Conversation:
    """One conversation of the workspace: its row id and the name that resumes it."""

    id: int
    name: str


@dataclass(frozen=True)
class Started:
    """A conversation began, or was resumed with `turns` turns already in it."""

    conversation: Conversation
    turns: int


@dataclass(frozen=True)
class Answered:
    """An answer to one message (a retrieval.answer.GroundedAnswer)."""

    answer: Any


@dataclass(frozen=True)
class NotAnswered:
    """A message that got no answer, and why (the model failed, the question was too vague)."""

    reason: str


ChatEvent = Started | Answered | NotAnswered
ReadLine = Callable[[], str | None]  # the next line the user typed, or None at the end of input
Show = Callable[[ChatEvent], None]


def run_chat(
    settings: Settings, read_line: ReadLine, show: Show, session: str | None = None, model: str | None = None
) -> Conversation:
    """Answer lines from `read_line` until /quit or the end of input; returns the conversation last used."""
    with Store(settings.db_path) as store, _embedded_server_kept(settings):
        conversation = open_conversation(store, session)
        show(Started(conversation, len(history(store, conversation))))
        while (line := read_line()) is not None:
            message = line.strip()
            if message == QUIT:
                break
            if message == NEW:
                conversation = new_conversation(store, conversation.name)
                show(Started(conversation, 0))
            elif message:
                show(reply(store, settings, conversation, message, model))
    return conversation


def reply(
    store: Store, settings: Settings, conversation: Conversation, message: str, model: str | None = None
) -> ChatEvent:
    """Answer `message` after the conversation's history and record both turns (nothing when it fails)."""
    from finetune_kit.retrieval.answer import answer_with_sources

    turns = history(store, conversation)
    try:
        answer = answer_with_sources(settings, message, history=turns, model=model)
    except (AnswerFailed, VagueQueryError) as exc:
        return NotAnswered(str(exc))
    record_exchange(store, conversation, message, answer)
    return Answered(answer)


def open_conversation(store: Store, name: str | None) -> Conversation:
    """The newest conversation called `name`, or a new one (named by the time when `name` is None)."""
    if name is not None:
        row = store.db.execute(
            "SELECT id, name FROM conversations WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        if row is not None:
            return Conversation(row["id"], row["name"])
    return new_conversation(store, name or datetime.now(UTC).strftime("chat-%Y%m%d-%H%M%S"))


def new_conversation(store: Store, name: str) -> Conversation:
    """A new, empty conversation called `name` (it becomes the one `--session name` resumes)."""
    cursor = store.db.execute("INSERT INTO conversations(name, created_at) VALUES (?, ?)", (name, utc_now()))
    return Conversation(int(cursor.lastrowid or 0), name)


def history(store: Store, conversation: Conversation, limit: int = MAX_HISTORY_TURNS) -> list[Turn]:
    """The conversation's newest turns, oldest first."""
    rows = store.db.execute(
        "SELECT role, text FROM conversation_turns WHERE conversation_id = ? ORDER BY seq DESC LIMIT ?",
        (conversation.id, limit),
    ).fetchall()
    return [Turn(row["role"], row["text"]) for row in reversed(rows)]


def record_exchange(store: Store, conversation: Conversation, message: str, answer: Any) -> None:
    """Store a message and its answer as the conversation's next two turns, in one transaction."""
    chunk_ids = json.dumps([hit.chunk_id for hit in answer.retrieved])
    with store.transaction() as db:
        seq = _next_seq(db, conversation)
        db.execute(
            "INSERT INTO conversation_turns(conversation_id, seq, role, text, query, created_at)"
            " VALUES (?, ?, 'user', ?, ?, ?)",
            (conversation.id, seq, message, answer.query, utc_now()),
        )
        db.execute(
            "INSERT INTO conversation_turns(conversation_id, seq, role, text, model, refused, chunk_ids_json,"
            " created_at) VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?)",
            (
                conversation.id,
                seq + 1,
                answer.answer,
                answer.model,
                int(answer.refused),
                chunk_ids,
                utc_now(),
            ),
        )


def _next_seq(db: sqlite3.Connection, conversation: Conversation) -> int:
    row = db.execute(
        "SELECT coalesce(max(seq), -1) + 1 FROM conversation_turns WHERE conversation_id = ?",
        (conversation.id,),
    ).fetchone()
    return int(row[0])


@contextlib.contextmanager
def _embedded_server_kept(settings: Settings) -> Iterator[None]:
    """Keep the workspace's embedded model server up for the whole chat, so no message waits for it to start."""
    if settings.resolved_provider != "local":
        yield
        return
    from finetune_kit.llm.local_server import local_server

    with local_server(settings):
        yield
