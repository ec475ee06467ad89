"""The ingest stage: content-hashed documents, incremental re-ingest, retirement, re-chunking, git sources."""

import subprocess
from pathlib import Path

from finetune_kit.config import load_settings
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store

SECTION = "## {title}\n\n" + "Quillstack keeps feature flags in one place and serves them fast. " * 12 + "\n"


def write_docs(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def active(store: Store, table: str) -> int:
    return int(store.scalar(f"SELECT count(*) FROM {table} WHERE status = 'active'"))


def test_unchanged_reingest_does_nothing(tmp_path: Path) -> None:
    docs = write_docs(
        tmp_path / "docs", {"a.md": "# A\n\n" + SECTION.format(title="One"), "b.md": "# B\n\nShort."}
    )
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        first = ingest(store, settings, [str(docs)])
        second = ingest(store, settings, [str(docs)])
        assert (first.documents_new, second.documents_new, second.documents_unchanged) == (2, 0, 2)
        assert second.chunks_new == 0 and active(store, "chunks") == first.chunks_new


def test_changed_file_is_a_new_version_and_unchanged_chunks_keep_their_ids(tmp_path: Path) -> None:
    body = "# Guide\n\n" + SECTION.format(title="Install") + "\n" + SECTION.format(title="Configure")
    docs = write_docs(tmp_path / "docs", {"guide.md": body})
    settings = load_settings(workspace=tmp_path / "ws", chunk_target_tokens=200)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)])
        before = {row[0] for row in store.db.execute("SELECT id FROM chunks WHERE status = 'active'")}
        (docs / "guide.md").write_text(body + "\n" + SECTION.format(title="Upgrade"))
        report = ingest(store, settings, [str(docs)])
        after = {row[0] for row in store.db.execute("SELECT id FROM chunks WHERE status = 'active'")}
        assert (report.documents_new, report.documents_retired) == (1, 1)
        assert before < after  # old chunks live on under the new version; only the new section is new
        assert store.scalar("SELECT count(*) FROM documents WHERE status = 'retired'") == 1


def test_deleted_file_is_retired_with_its_chunks(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", {"keep.md": "# Keep\n\nStays.", "gone.md": "# Gone\n\nLeaves."})
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)])
        (docs / "gone.md").unlink()
        report = ingest(store, settings, [str(docs)])
        assert (report.documents_retired, report.chunks_retired) == (1, 1)
        assert [row[0] for row in store.db.execute("SELECT path FROM documents WHERE status = 'active'")] == [
            "keep.md"
        ]


def test_new_chunk_settings_rechunk_every_document(tmp_path: Path) -> None:
    body = "# Guide\n\n" + "".join(SECTION.format(title=t) for t in ("One", "Two", "Three"))
    docs = write_docs(tmp_path / "docs", {"guide.md": body})
    with Store(tmp_path / "ws" / "state.db") as store:
        ingest(store, load_settings(workspace=tmp_path / "ws", chunk_target_tokens=512), [str(docs)])
        coarse = active(store, "chunks")
        report = ingest(store, load_settings(workspace=tmp_path / "ws", chunk_target_tokens=150), [str(docs)])
        assert report.documents_rechunked == 1 and active(store, "chunks") > coarse


def test_skipped_files_are_recorded_with_reasons(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", {"ok.md": "# Fine\n\nText."})
    (docs / "bad.md").write_bytes(b"\x00\x01\x02")
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        report = ingest(store, settings, [str(docs)])
        assert report.skipped == [("bad.md", "binary file")]
        rows = store.db.execute("SELECT path, reason FROM skipped_files").fetchall()
        assert [tuple(row) for row in rows] == [("bad.md", "binary file")]


def test_git_repository_documents_link_to_their_permalink(tmp_path: Path) -> None:
    repo = write_docs(tmp_path / "repo", {"docs/intro.md": "# Intro\n\nQuillstack serves flags."})
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "git@github.com:acme/quill.git"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "docs"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(repo)])
        urls = [row[0] for row in store.db.execute("SELECT source_url FROM chunks")]
    assert urls == [f"https://github.com/acme/quill/blob/{commit}/docs/intro.md"]
