import sqlite3
from pathlib import Path

import pytest

from finetune_kit.errors import StoreError
from finetune_kit.store import MIGRATIONS, Store, migrate


def migration_names(store: Store) -> list[str]:
    return [row[0] for row in store.db.execute("SELECT name FROM migrations ORDER BY name")]


def test_fresh_database_records_every_migration(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        assert migration_names(store) == [name for name, _ in MIGRATIONS]


# the retrieval index (0012): its own tables and the shadow tables SQLite keeps for the FTS5 table
INDEX_TABLES = {"index_chunks", "index_windows", "embeddings", "index_meta", "chunks_fts"} | {
    f"chunks_fts_{part}" for part in ("config", "content", "data", "docsize", "idx")
}


def test_fresh_database_has_the_tables(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        tables = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    assert tables == {
        "migrations",
        "runs",
        "sources",
        "documents",
        "skipped_files",
        "chunks",
        "question_sets",
        "questions",
        "answers",
        "llm_calls",
        "batches",
        "batch_requests",
        "slack_events",
        "slack_answers",
        "slack_replies",
        "slack_feedback",
        "slack_answer_chunks",
        "training_files",
        "jobs",
        "job_events",
        "job_metrics",
        "finetuned_models",
        "web_pages",
        "local_jobs",
        "local_job_events",
        "work_origins",
        "chunks_fts",  # FTS5: the table and its shadow tables
        "chunks_fts_data",
        "chunks_fts_idx",
        "chunks_fts_content",
        "chunks_fts_docsize",
        "chunks_fts_config",
        "index_chunks",
        "index_windows",
        "embeddings",
        "index_meta",
        "conversations",
        "conversation_turns",
    }


def test_store_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "work" / "space" / "state.db"

    Store(path).close()

    assert path.is_file()


def test_reopening_applies_nothing_new(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        first = store.db.execute("SELECT name, applied_at FROM migrations").fetchall()

    with Store(path) as store:
        assert migrate(store.db) == []
        assert store.db.execute("SELECT name, applied_at FROM migrations").fetchall() == first


def test_migrate_on_empty_connection_returns_names_applied(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "raw.db", isolation_level=None)
    try:
        assert migrate(db) == [name for name, _ in MIGRATIONS]
        assert migrate(db) == []
    finally:
        db.close()


def test_newer_migration_row_raises(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.db.execute("INSERT INTO migrations(name, applied_at) VALUES ('0099_future', 'later')")

    with pytest.raises(StoreError) as excinfo:
        Store(path)

    assert str(excinfo.value) == (
        "state database has migrations ['0099_future'] from a newer ftkit — upgrade ftkit"
    )


def test_transaction_commits(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        with store.transaction() as db:
            db.execute("INSERT INTO sources(id, spec, kind) VALUES ('s1', 'docs/', 'files')")

        assert store.scalar("SELECT count(*) FROM sources") == 1


def test_transaction_rolls_back_on_exception(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        with pytest.raises(RuntimeError, match=r"^boom$"), store.transaction() as db:
            db.execute("INSERT INTO sources(id, spec, kind) VALUES ('s1', 'docs/', 'files')")
            db.execute("INSERT INTO sources(id, spec, kind) VALUES ('s2', 'more/', 'files')")
            raise RuntimeError("boom")

        assert store.scalar("SELECT count(*) FROM sources") == 0
        assert store.db.in_transaction is False


def test_rolled_back_rows_are_invisible_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store, pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
        db.execute("INSERT INTO sources(id, spec, kind) VALUES ('s1', 'docs/', 'files')")
        db.execute("INSERT INTO sources(id, spec, kind) VALUES ('s1', 'again/', 'files')")

    with Store(path) as store:
        assert store.scalar("SELECT count(*) FROM sources") == 0


def test_wal_mode_and_foreign_keys_are_on(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        assert store.scalar("PRAGMA journal_mode") == "wal"
        assert store.scalar("PRAGMA foreign_keys") == 1


def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store, pytest.raises(sqlite3.IntegrityError):
        store.db.execute(
            "INSERT INTO chunks(id, document_id, seq, heading_path, text, n_tokens, source_url)"
            " VALUES ('c1', 'no-such-document', 0, '', 'text', 1, 'u')"
        )


def test_scalar_returns_none_without_rows(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        assert store.scalar("SELECT id FROM runs") is None


def test_runs_are_recorded(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        run_id = store.start_run("ingest")
        store.finish_run(run_id, "ok", {"documents": 2})
        row = store.db.execute(
            "SELECT command, status, summary_json FROM runs WHERE id = ?", (run_id,)
        ).fetchone()

    assert (run_id, tuple(row)) == (1, ("ingest", "ok", '{"documents": 2}'))


def test_garbage_file_raises_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database\n" * 100)

    with pytest.raises(StoreError) as excinfo:
        Store(path)

    assert str(excinfo.value) == (
        f"{path}: cannot open the state database (file is not a database) — move it aside to start over"
    )
