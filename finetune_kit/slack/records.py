"""The bot's rows in the state database: events seen, questions claimed and answered, replies, feedback."""

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from finetune_kit.slack.answerer import SourcedAnswer
from finetune_kit.store import Store, utc_now

# Slack retries an event three times within about an hour; a day of event ids covers any retry.
EVENT_MEMORY = timedelta(days=1)


@dataclass(frozen=True)
class Question:
    """A user's message the bot answers, and where the answer goes."""

    channel: str
    ts: str
    thread_ts: str
    user: str
    text: str


@dataclass(frozen=True)
class PendingAnswer:
    """A claimed question whose answer never finished (the bot was stopped): resumed at the next start."""

    id: int
    question: Question
    placeholder_ts: str | None


class BotRecords:
    """Thread-safe access to the slack_* tables (the bot answers on many threads at once)."""

    def __init__(self, path: Path) -> None:
        Store(path).close()  # creates the database and applies the migrations
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def first_delivery(self, event_id: str, event_type: str) -> bool:
        """Record an event id; False if it was seen before (a Slack retry or a duplicate delivery)."""
        with self._locked() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO slack_events(event_id, event_type, received_at) VALUES (?, ?, ?)",
                (event_id, event_type, utc_now()),
            )
            return cursor.rowcount == 1

    def forget_old_events(self, now: datetime | None = None) -> int:
        """Drop event ids older than Slack could still retry; returns how many."""
        cutoff = ((now or datetime.now(UTC)) - EVENT_MEMORY).isoformat(timespec="seconds")
        with self._locked() as db:
            return db.execute("DELETE FROM slack_events WHERE received_at < ?", (cutoff,)).rowcount

    def claim(self, question: Question) -> int | None:
        """The answer id for this message, or None if another event for the same message claimed it first."""
        with self._locked() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO slack_answers(channel, question_ts, thread_ts, user_id, question, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (question.channel, question.ts, question.thread_ts, question.user, question.text, utc_now()),
            )
            return cursor.lastrowid if cursor.rowcount == 1 else None

    def set_placeholder(self, answer_id: int, ts: str) -> None:
        """Remember the placeholder message that the answer will replace."""
        with self._locked() as db:
            db.execute("UPDATE slack_answers SET placeholder_ts = ? WHERE id = ?", (ts, answer_id))

    def finish(
        self,
        answer_id: int,
        status: Literal["answered", "failed"],
        *,
        text: str | None,
        error: str | None,
        model: str,
        latency_ms: int,
        reply_ts: list[str],
        channel: str,
        grounded: SourcedAnswer | None = None,
    ) -> None:
        """Record how a question ended, the messages that carry the answer (for feedback) and, for an answer from
        the docs, what it searched for and the chunks it retrieved."""
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE slack_answers SET status = ?, answer = ?, error = ?, model = ?, latency_ms = ?,"
                    " finished_at = ? WHERE id = ?",
                    (status, text, error, model, latency_ms, utc_now(), answer_id),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO slack_replies(channel, ts, answer_id) VALUES (?, ?, ?)",
                    [(channel, ts, answer_id) for ts in reply_ts],
                )
                if grounded is not None:
                    _record_chunks(db, answer_id, grounded)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def answered_in_thread(self, channel: str, thread_ts: str) -> bool:
        """True when the bot has answered in this thread: its follow-ups are for the bot."""
        with self._locked() as db:
            row = db.execute(
                "SELECT 1 FROM slack_answers WHERE channel = ? AND thread_ts = ? LIMIT 1",
                (channel, thread_ts),
            ).fetchone()
            return row is not None

    def not_answers(self, channel: str, thread_ts: str) -> set[str]:
        """The bot's messages in a thread that are not answers: placeholders and error notes."""
        with self._locked() as db:
            rows = db.execute(
                "SELECT placeholder_ts FROM slack_answers WHERE channel = ? AND thread_ts = ?"
                " AND status != 'answered' AND placeholder_ts IS NOT NULL",
                (channel, thread_ts),
            ).fetchall()
            return {row[0] for row in rows}

    def pending(self) -> list[PendingAnswer]:
        """Questions claimed but never finished, oldest first."""
        with self._locked() as db:
            rows = db.execute("SELECT * FROM slack_answers WHERE status = 'pending' ORDER BY id").fetchall()
        return [
            PendingAnswer(
                row["id"],
                Question(
                    row["channel"], row["question_ts"], row["thread_ts"], row["user_id"], row["question"]
                ),
                row["placeholder_ts"],
            )
            for row in rows
        ]

    def add_feedback(self, channel: str, ts: str, user: str, reaction: str, rating: int) -> bool:
        """Record a 👍/👎 on one of the bot's answers; False when the message is not an answer."""
        with self._locked() as db:
            cursor = db.execute(
                "INSERT OR REPLACE INTO slack_feedback(answer_id, user_id, reaction, rating, created_at)"
                " SELECT answer_id, ?, ?, ?, ? FROM slack_replies WHERE channel = ? AND ts = ?",
                (user, reaction, rating, utc_now(), channel, ts),
            )
            return cursor.rowcount > 0

    def remove_feedback(self, channel: str, ts: str, user: str, reaction: str) -> bool:
        """Forget a reaction the user took back; False when there was none."""
        with self._locked() as db:
            cursor = db.execute(
                "DELETE FROM slack_feedback WHERE user_id = ? AND reaction = ? AND answer_id ="
                " (SELECT answer_id FROM slack_replies WHERE channel = ? AND ts = ?)",
                (user, reaction, channel, ts),
            )
            return cursor.rowcount > 0


def _record_chunks(db: sqlite3.Connection, answer_id: int, grounded: SourcedAnswer) -> None:
    """The query, refusal and retrieved chunks (cited or not) of one answer from the docs."""
    db.execute(
        "UPDATE slack_answers SET query = ?, refused = ? WHERE id = ?",
        (grounded.query, int(grounded.refused), answer_id),
    )
    cited = {source.chunk_id for source in grounded.sources}
    db.execute("DELETE FROM slack_answer_chunks WHERE answer_id = ?", (answer_id,))
    db.executemany(
        "INSERT INTO slack_answer_chunks(answer_id, rank, chunk_id, score, cited) VALUES (?, ?, ?, ?, ?)",
        [
            (answer_id, rank, hit.chunk_id, hit.score, int(hit.chunk_id in cited))
            for rank, hit in enumerate(grounded.retrieved, 1)
        ],
    )
