"""SQLite state: ordered, recorded migrations and the queries every stage uses to resume."""

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_kit.disk_space import NEARLY_FULL_BYTES, SQLITE_IOERR, disk_full_error, free_bytes, is_disk_full
from finetune_kit.errors import DiskFullError, StoreError
from finetune_kit.procs import pid_alive, process_start_time

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            command TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            status TEXT NOT NULL DEFAULT 'running',
            summary_json TEXT
        );
        CREATE TABLE sources (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            kind TEXT NOT NULL,
            last_sync TEXT
        );
        CREATE TABLE documents (
            id TEXT PRIMARY KEY,
            source_id TEXT NOT NULL REFERENCES sources(id),
            path TEXT NOT NULL,
            source_url TEXT NOT NULL,
            format TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            chunker_key TEXT NOT NULL,
            text TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired')),
            ingested_at TEXT NOT NULL,
            retired_at TEXT
        );
        CREATE UNIQUE INDEX documents_one_active_version
            ON documents(source_id, path) WHERE status = 'active';
        CREATE TABLE skipped_files (
            source_id TEXT NOT NULL REFERENCES sources(id),
            path TEXT NOT NULL,
            reason TEXT NOT NULL,
            seen_at TEXT NOT NULL,
            PRIMARY KEY (source_id, path)
        );
        CREATE TABLE chunks (
            id TEXT PRIMARY KEY,
            document_id TEXT NOT NULL REFERENCES documents(id),
            seq INTEGER NOT NULL,
            heading_path TEXT NOT NULL,
            text TEXT NOT NULL,
            n_tokens INTEGER NOT NULL,
            source_url TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'retired'))
        );
        CREATE INDEX chunks_by_document ON chunks(document_id);
        CREATE TABLE question_sets (
            chunk_id TEXT NOT NULL REFERENCES chunks(id),
            generation_key TEXT NOT NULL,
            n_accepted INTEGER NOT NULL,
            reason TEXT,
            created_at TEXT NOT NULL,
            PRIMARY KEY (chunk_id, generation_key)
        );
        CREATE TABLE questions (
            id TEXT PRIMARY KEY,
            chunk_id TEXT NOT NULL REFERENCES chunks(id),
            generation_key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            text TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
            reason TEXT
        );
        CREATE INDEX questions_by_chunk ON questions(chunk_id, generation_key);
        CREATE TABLE answers (
            question_id TEXT NOT NULL REFERENCES questions(id),
            answer_key TEXT NOT NULL,
            text TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
            reason TEXT,
            created_at TEXT NOT NULL,
            PRIMARY KEY (question_id, answer_key)
        );
        CREATE TABLE llm_calls (
            request_hash TEXT PRIMARY KEY,
            stage TEXT NOT NULL,
            model TEXT NOT NULL,
            request_json TEXT NOT NULL,
            response_json TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            run_id INTEGER REFERENCES runs(id),
            created_at TEXT NOT NULL
        );
        """,
    ),
    (
        "0002_batches",
        """
        CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            request_set TEXT NOT NULL,
            stage TEXT,
            input_file_id TEXT,
            status TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            merged_at TEXT
        );
        CREATE INDEX batches_by_request_set ON batches(request_set);
        CREATE TABLE batch_requests (
            batch_id TEXT NOT NULL REFERENCES batches(id),
            request_hash TEXT NOT NULL,
            PRIMARY KEY (batch_id, request_hash)
        );
        """,
    ),
    (
        "0003_slack",
        """
        CREATE TABLE slack_events (
            event_id TEXT PRIMARY KEY,
            event_type TEXT NOT NULL,
            received_at TEXT NOT NULL
        );
        CREATE TABLE slack_answers (
            id INTEGER PRIMARY KEY,
            channel TEXT NOT NULL,
            question_ts TEXT NOT NULL,
            thread_ts TEXT NOT NULL,
            user_id TEXT,
            question TEXT NOT NULL,
            placeholder_ts TEXT,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'answered', 'failed')),
            answer TEXT,
            error TEXT,
            model TEXT,
            latency_ms INTEGER,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            UNIQUE (channel, question_ts)
        );
        CREATE INDEX slack_answers_by_thread ON slack_answers(channel, thread_ts);
        CREATE TABLE slack_replies (
            channel TEXT NOT NULL,
            ts TEXT NOT NULL,
            answer_id INTEGER NOT NULL REFERENCES slack_answers(id),
            PRIMARY KEY (channel, ts)
        );
        CREATE TABLE slack_feedback (
            answer_id INTEGER NOT NULL REFERENCES slack_answers(id),
            user_id TEXT NOT NULL,
            reaction TEXT NOT NULL,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            created_at TEXT NOT NULL,
            PRIMARY KEY (answer_id, user_id, reaction)
        );
        """,
    ),
    (
        "0004_training",
        """
        CREATE TABLE training_files (
            backend TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            purpose TEXT NOT NULL,
            file_id TEXT NOT NULL,
            uploaded_at TEXT NOT NULL,
            PRIMARY KEY (backend, sha256, purpose)
        );
        CREATE TABLE jobs (
            key TEXT PRIMARY KEY,
            id TEXT UNIQUE,
            backend TEXT NOT NULL,
            status TEXT NOT NULL,
            base_model TEXT NOT NULL,
            dataset_hash TEXT NOT NULL,
            params_json TEXT NOT NULL,
            train_file_id TEXT NOT NULL,
            validation_file_id TEXT,
            fine_tuned_model TEXT,
            error TEXT,
            estimated_finish INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            finished_at TEXT,
            last_event_id TEXT
        );
        CREATE TABLE job_events (
            job_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            data_json TEXT,
            PRIMARY KEY (job_id, event_id)
        );
        CREATE TABLE job_metrics (
            job_id TEXT NOT NULL,
            step INTEGER NOT NULL,
            total_steps INTEGER,
            train_loss REAL,
            valid_loss REAL,
            full_valid_loss REAL,
            train_accuracy REAL,
            valid_accuracy REAL,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (job_id, step)
        );
        CREATE TABLE finetuned_models (
            name TEXT PRIMARY KEY,
            backend TEXT NOT NULL,
            base_model TEXT NOT NULL,
            job_id TEXT NOT NULL,
            dataset_hash TEXT NOT NULL,
            created_at TEXT NOT NULL,
            metrics_json TEXT NOT NULL
        );
        """,
    ),
    (
        # per crawled page: HTTP validators and sitemap lastmod, so a re-crawl skips unchanged pages; written
        # during the crawl, before ingest creates the source row, hence no foreign key
        "0007_web_pages",
        """
        CREATE TABLE web_pages (
            source_id TEXT NOT NULL,
            url TEXT NOT NULL,
            path TEXT NOT NULL,
            etag TEXT,
            last_modified TEXT,
            lastmod TEXT,
            text_sha256 TEXT NOT NULL,
            links_json TEXT NOT NULL,
            fetched_at TEXT NOT NULL,
            PRIMARY KEY (source_id, url)
        );
        """,
    ),
    (
        # the local LoRA backend's own job service: the detached trainer writes here, `ftkit train --watch`
        # reads it through the same FineTuneBackend protocol as the hosted API
        "0008_local_training",
        """
        CREATE TABLE local_jobs (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            base_model TEXT NOT NULL,
            base_gguf TEXT,
            params_json TEXT NOT NULL,
            options_json TEXT NOT NULL,
            metadata_json TEXT NOT NULL,
            train_file TEXT NOT NULL,
            validation_file TEXT,
            output_dir TEXT NOT NULL,
            pid INTEGER,
            pid_started TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            fine_tuned_model TEXT,
            error TEXT,
            estimated_finish INTEGER,
            trained_tokens INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE local_job_events (
            seq INTEGER PRIMARY KEY,  -- rows are never deleted, so rowids only grow
            job_id TEXT NOT NULL REFERENCES local_jobs(id),
            created_at INTEGER NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            data_json TEXT NOT NULL
        );
        CREATE INDEX local_job_events_by_job ON local_job_events(job_id, seq);
        """,
    ),
    (
        # which Airtable models table a model was last written to: a failed write is retried, a new table filled
        "0009_model_sinks",
        "ALTER TABLE finetuned_models ADD COLUMN airtable_table TEXT;",
    ),
    (
        # which endpoint and model a question set's generation_key or an answer_key stands for, so `ftkit status`
        # can say who made the work a workspace holds, and a stage about to redo it can say why
        "0010_work_origins",
        """
        CREATE TABLE work_origins (
            key TEXT PRIMARY KEY,
            stage TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            model TEXT NOT NULL,
            recorded_at TEXT NOT NULL
        );
        """,
    ),
    (
        # which process records a run, so a run whose process was killed shows as interrupted, not running
        "0011_run_process",
        """
        ALTER TABLE runs ADD COLUMN pid INTEGER;
        ALTER TABLE runs ADD COLUMN pid_started TEXT;
        """,
    ),
    (
        # the retrieval index that follows the active chunks: FTS5 rows (title, heading path, text), the windows
        # each chunk is cut into to fit the embedder, and their vectors stored by window text hash, so an
        # unchanged window is never embedded twice; index_chunks says which version of each chunk is indexed
        "0012_retrieval_index",
        """
        CREATE VIRTUAL TABLE chunks_fts USING fts5(
            chunk_id UNINDEXED, title, heading, text, tokenize = 'porter unicode61'
        );
        CREATE TABLE index_chunks (
            chunk_id TEXT PRIMARY KEY REFERENCES chunks(id),
            document_id TEXT NOT NULL,
            fts_rowid INTEGER NOT NULL UNIQUE,
            title TEXT NOT NULL,
            n_windows INTEGER NOT NULL
        );
        CREATE TABLE index_windows (
            chunk_id TEXT NOT NULL REFERENCES chunks(id),
            seq INTEGER NOT NULL,
            text_hash TEXT NOT NULL,
            char_start INTEGER NOT NULL,
            char_end INTEGER NOT NULL,
            PRIMARY KEY (chunk_id, seq)
        );
        CREATE INDEX index_windows_by_hash ON index_windows(text_hash);
        CREATE TABLE embeddings (
            text_hash TEXT NOT NULL,
            embedder_key TEXT NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (text_hash, embedder_key)
        );
        CREATE TABLE index_meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (
        # what a grounded answer of the bot searched for and the chunks it retrieved (cited or not), so a 👍/👎
        # can be traced to the chunks behind the answer; refused: 1 for "the docs do not cover it"
        "0013_slack_answer_chunks",
        """
        ALTER TABLE slack_answers ADD COLUMN query TEXT;
        ALTER TABLE slack_answers ADD COLUMN refused INTEGER;
        CREATE TABLE slack_answer_chunks (
            answer_id INTEGER NOT NULL REFERENCES slack_answers(id),
            rank INTEGER NOT NULL,
            chunk_id TEXT NOT NULL REFERENCES chunks(id),
            score REAL NOT NULL,
            cited INTEGER NOT NULL CHECK (cited IN (0, 1)),
            PRIMARY KEY (answer_id, rank)
        );
        CREATE INDEX slack_answer_chunks_by_chunk ON slack_answer_chunks(chunk_id);
        """,
    ),
    (
        # `ftkit chat`: conversations (a name resumes the newest one under it) and their turns, each answer with
        # the retrieval query it searched and the chunks it was given, so a follow-up has its thread's history
        "0014_chat_history",
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE INDEX conversations_by_name ON conversations(name, id);
        CREATE TABLE conversation_turns (
            conversation_id INTEGER NOT NULL REFERENCES conversations(id),
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text TEXT NOT NULL,
            query TEXT,
            model TEXT,
            refused INTEGER,
            chunk_ids_json TEXT,
            created_at TEXT NOT NULL,
            PRIMARY KEY (conversation_id, seq)
        );
        """,
    ),
]


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Connection(sqlite3.Connection):
    """A connection whose "database or disk is full" errors name the database file and the space free."""

    path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        with self._full_disk_named():
            return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        with self._full_disk_named():
            return super().executemany(sql, parameters)

    @contextmanager
    def _full_disk_named(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path) from exc
            raise


class Store:
    """One workspace's SQLite state database (WAL, foreign keys on, migrations applied on open)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30, factory=_Connection)
            self.db.path = path
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrate(self.db)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(path) from exc
            raise
        except sqlite3.DatabaseError as exc:
            raise _open_error(path, exc) from exc

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work: committed on success, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk among them)
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def scalar(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        """The first column of the first row of a query, or None."""
        row = self.db.execute(sql, params).fetchone()
        return row[0] if row else None

    def start_run(self, command: str) -> int:
        """Record the start of a command by this process; returns its run id."""
        pid = os.getpid()
        cur = self.db.execute(
            "INSERT INTO runs(command, started_at, pid, pid_started) VALUES (?, ?, ?, ?)",
            (command, utc_now(), pid, process_start_time(pid)),
        )
        return int(cur.lastrowid or 0)

    def mark_interrupted_runs(self) -> int:
        """Mark runs whose process died unrecorded (kill -9) as interrupted; the workspace's writer calls it."""
        rows = self.db.execute("SELECT id, pid, pid_started FROM runs WHERE status = 'running'").fetchall()
        dead = [
            row["id"]  # with the writer lock held, a run without a pid (older ftkit) cannot be running either
            for row in rows
            if row["pid"] is None or run_status("running", row["pid"], row["pid_started"]) != "running"
        ]
        for run_id in dead:
            self.finish_run(run_id, "interrupted")
        return len(dead)

    def finish_run(self, run_id: int, status: str, summary: dict[str, object] | None = None) -> None:
        """Record how a run ended."""
        self.db.execute(
            "UPDATE runs SET finished_at = ?, status = ?, summary_json = ? WHERE id = ?",
            (utc_now(), status, json.dumps(summary) if summary is not None else None, run_id),
        )


def run_status(status: str, pid: int | None, pid_started: str | None) -> str:
    """A run's status as it stands: "running" only while the process that recorded it still runs."""
    if status != "running" or pid is None:  # no pid: recorded before 0011_run_process, cannot tell
        return status
    alive = pid_alive(pid) and (pid_started is None or process_start_time(pid) in (None, pid_started))
    return "running" if alive else "interrupted"


def _open_error(path: Path, exc: sqlite3.DatabaseError) -> DiskFullError | StoreError:
    """Why the database cannot be opened: a full disk (free some space) or a damaged file (move it aside)."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    free = free_bytes(path)
    if is_disk_full(exc) or (code == SQLITE_IOERR and free is not None and free < NEARLY_FULL_BYTES):
        return disk_full_error(path)
    return StoreError(f"{path}: cannot open the state database ({exc}) — move it aside to start over")


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM migrations")}
    known = {name for name, _ in MIGRATIONS}
    if unknown := done - known:
        raise StoreError(
            f"state database has migrations {sorted(unknown)} from a newer ftkit — upgrade ftkit"
        )
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        if db.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
            db.execute("ROLLBACK")  # another process applied it while this one waited for the write lock
            continue
        try:
            for statement in _statements(sql):
                db.execute(statement)
            db.execute("INSERT INTO migrations(name, applied_at) VALUES (?, ?)", (name, utc_now()))
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        applied.append(name)
    return applied


def _statements(sql: str) -> list[str]:
    return [part.strip() for part in sql.split(";") if part.strip()]
