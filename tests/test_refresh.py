"""`ftkit refresh`: every known source read again, what changed said per source, a vanished one reported."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import SourceError
from finetune_kit.retrieval.index import update_index
from finetune_kit.stages.ingest import ingest
from finetune_kit.stages.refresh import RefreshReport, SourceChange, refresh_sources
from finetune_kit.store import Store
from tests.fake_openai import FakeOpenAI, _is_question_request, _last_user_text
from tests.hashed_embedder import HashedEmbedder

BODY = "Quillstack keeps feature flags in one place and serves them to every application quickly. " * 8


def page(title: str, extra: str = "") -> str:
    return (
        f"# {title}\n\n## Overview\n\n{title}-guide. {BODY}{extra}\n\n## Details\n\n{title}-details. {BODY}\n"
    )


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def hashed(settings: Settings) -> HashedEmbedder:
    """A small real embedder, so that the index follows without loading a model."""
    return HashedEmbedder()


def ingest_with(settings: Settings, specs: list[str]) -> None:
    """Ingest, and build the index as `ftkit index` would (conftest turns index_on_ingest off)."""
    with Store(settings.db_path) as store:
        ingest(store, settings, specs, open_embedder=hashed)
        update_index(store, settings, open_embedder=hashed)


def refresh(settings: Settings) -> RefreshReport:
    with Store(settings.db_path) as store:
        return refresh_sources(store, settings, open_embedder=hashed)


def by_spec(report: RefreshReport, spec: str) -> SourceChange:
    return next(change for change in report.sources if change.spec == spec)


def counts(change: SourceChange) -> tuple[int, int, int, int]:
    return (
        change.documents_added,
        change.documents_changed,
        change.documents_retired,
        change.documents_unchanged,
    )


def test_a_folder_edited_between_two_refreshes(tmp_path: Path) -> None:
    docs = write(tmp_path / "docs", {"a.md": page("A"), "b.md": page("B"), "c.md": page("C")})
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, [str(docs)])
    report = refresh(settings)
    unchanged = report.sources[0]
    assert counts(unchanged) == (0, 0, 0, 3) and (unchanged.chunks_added, unchanged.chunks_retired) == (0, 0)
    assert report.index is not None and report.index.windows_embedded == 0
    (docs / "a.md").write_text(page("A", " Now with scheduled changes."))
    (docs / "b.md").unlink()
    write(docs, {"d.md": page("D")})
    report = refresh(settings)
    change = report.sources[0]
    assert change.error is None
    assert counts(change) == (1, 1, 1, 1)
    assert change.chunks_added == 1 + 2  # a.md's edited section, d.md's two
    assert change.chunks_retired == 1 + 2  # a.md's old section, b.md's two
    assert report.index is not None and report.index.windows_embedded > 0
    assert counts(refresh(settings).sources[0]) == (0, 0, 0, 3)


def git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def test_a_git_source_with_a_new_commit_is_pulled(tmp_path: Path) -> None:
    origin = write(tmp_path / "origin", {"guide.md": page("Guide")})
    git(origin, "init", "-q")
    git(origin, "add", ".")
    git(origin, "commit", "-qm", "first")
    spec = origin.as_uri()  # a clone URL: ingest clones it into the workspace's cache
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, [spec])
    write(origin, {"faq.md": page("FAQ")})
    git(origin, "add", ".")
    git(origin, "commit", "-qm", "second")
    change = by_spec(refresh(settings), spec)
    assert change.kind == "git" and change.error is None
    assert (change.documents_added, change.chunks_added) == (1, 2)
    with Store(settings.db_path) as store:
        paths = {row[0] for row in store.db.execute("SELECT path FROM documents WHERE status = 'active'")}
    assert paths == {"guide.md", "faq.md"}


def test_a_source_whose_root_vanished_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    kept = write(tmp_path / "kept", {"a.md": page("A")})
    gone = write(tmp_path / "gone", {"b.md": page("B")})
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, [str(kept), str(gone)])
    shutil.rmtree(gone)
    write(kept, {"new.md": page("New")})
    report = refresh(settings)
    assert (
        by_spec(report, str(gone)).error
        == f"{gone}: this source's root is gone — restore it, or ignore this line if it was removed"
    )
    assert counts(by_spec(report, str(kept))) == (1, 0, 0, 1)
    with Store(settings.db_path) as store:  # a vanished root retires nothing: it may be an unmounted disk
        assert store.scalar("SELECT count(*) FROM documents WHERE path = 'b.md' AND status = 'active'") == 1


def test_a_relative_folder_is_found_again_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "docs", {"a.md": page("A")})
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, ["docs"])  # the conftest runs every test in tmp_path
    write(tmp_path / "docs", {"b.md": page("B")})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert counts(refresh(settings).sources[0]) == (1, 0, 0, 1)


def test_every_source_gone_is_an_error_naming_them(tmp_path: Path) -> None:
    gone = write(tmp_path / "gone", {"b.md": page("B")})
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, [str(gone)])
    shutil.rmtree(gone)
    with pytest.raises(SourceError, match="root is gone"):
        refresh(settings)


def test_the_command_prints_one_line_per_source(tmp_path: Path, runner: CliRunner) -> None:
    docs = write(tmp_path / "docs", {"a.md": page("A")})
    assert runner.invoke(app, ["ingest", str(docs), "-w", "ws"]).exit_code == 0
    write(docs, {"b.md": page("B")})
    result = runner.invoke(app, ["refresh", "-w", "ws"])
    assert result.exit_code == 0, result.output
    assert (
        f"{docs} (directory): 1 documents added, 0 changed, 0 retired, 1 unchanged; 2 chunks added, 0 retired\n"
        in result.output
    )
    assert "0 retired\nIndex: 4 chunks added, 0 removed; " in result.output  # its first build


def test_refresh_without_a_workspace_says_to_ingest_first(tmp_path: Path, runner: CliRunner) -> None:
    result = runner.invoke(app, ["refresh", "-w", "nothing-here"])
    assert result.exit_code == 1
    assert "no ftkit workspace here — run `ftkit ingest DOCS` first" in result.output
    assert not (tmp_path / "nothing-here").exists()


def test_generate_writes_questions_for_new_chunks_only(
    tmp_path: Path, runner: CliRunner, fake_llm: FakeOpenAI
) -> None:
    docs = write(tmp_path / "docs", {"a.md": page("A")})
    assert runner.invoke(app, ["ingest", str(docs), "-w", "ws"]).exit_code == 0
    result = runner.invoke(app, ["refresh", "-w", "ws", "--generate", "--product", "Quillstack"])
    assert result.exit_code == 0, result.output
    first = len(fake_llm.requests)
    assert first > 0
    write(docs, {"b.md": page("B")})
    result = runner.invoke(app, ["refresh", "-w", "ws", "--generate", "--product", "Quillstack"])
    assert result.exit_code == 0, result.output
    asked = [_last_user_text(body) for body in fake_llm.requests[first:]]
    asked = [text for text in asked if _is_question_request(text)]
    assert len(asked) == 2 and all("B-" in text and "A-" not in text for text in asked)
    with Store(Path("ws/state.db")) as store:
        lacking = store.scalar(
            "SELECT count(*) FROM chunks c WHERE c.status = 'active'"
            " AND NOT EXISTS (SELECT 1 FROM questions q WHERE q.chunk_id = c.id)"
        )
    assert lacking == 0


def test_with_index_on_ingest_each_source_says_what_it_embedded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_RETRIEVAL_INDEX_ON_INGEST", "true")
    docs = write(tmp_path / "docs", {"a.md": page("A")})
    settings = load_settings(workspace=tmp_path / "ws")
    ingest_with(settings, [str(docs)])
    assert refresh(settings).sources[0].windows_embedded == 0
    (docs / "a.md").write_text(page("A", " Now with scheduled changes."))
    change = refresh(settings).sources[0]
    assert change.windows_embedded is not None and change.windows_embedded > 0
    assert change.line().endswith(f"1 chunks added, 1 retired; {change.windows_embedded} windows embedded")
