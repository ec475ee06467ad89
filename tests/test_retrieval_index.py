"""The index follows the chunks: incremental by window text hash, consistent after kill -9, one embedder per index."""

import hashlib
import itertools
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ExtraMissingError, RetrievalIndexError
from finetune_kit.retrieval.index import (
    LEXICAL_ONLY,
    EmbedderFactory,
    index_state,
    set_threshold,
    update_index,
)
from finetune_kit.retrieval.search import Retriever
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.conftest import REPO, SAMPLE_DOCS
from tests.hashed_embedder import HashedEmbedder

NO_EMBEDDER_MESSAGE = "no local embedder — run `pip install 'finetune_kit[retrieval]'`"


@pytest.fixture(autouse=True)
def index_on_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the index that ingest keeps current (conftest turns that off for the others)."""
    monkeypatch.setenv("FTKIT_RETRIEVAL_INDEX_ON_INGEST", "true")


def using(embedder: HashedEmbedder) -> EmbedderFactory:
    """A factory that hands out this one embedder (so a test can see what it embedded)."""
    return lambda settings: embedder


def no_embedder(settings: Settings) -> HashedEmbedder:
    """A factory for a machine without the local embedder."""
    raise ExtraMissingError(NO_EMBEDDER_MESSAGE)


def copy_docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, docs)
    return docs


def active_chunks(store: Store) -> set[str]:
    return {row[0] for row in store.db.execute("SELECT id FROM chunks WHERE status = 'active'")}


def assert_index_matches_chunks(db: sqlite3.Connection, key: str | None) -> None:
    """Index rows are exactly the active chunks, each with its FTS row, its windows and their vectors."""
    active = {row[0] for row in db.execute("SELECT id FROM chunks WHERE status = 'active'")}
    indexed = {row[0] for row in db.execute("SELECT chunk_id FROM index_chunks")}
    assert indexed == active
    fts = dict(db.execute("SELECT rowid, chunk_id FROM chunks_fts").fetchall())
    assert fts == dict(db.execute("SELECT fts_rowid, chunk_id FROM index_chunks").fetchall())
    windows = dict(db.execute("SELECT chunk_id, count(*) FROM index_windows GROUP BY chunk_id").fetchall())
    for chunk_id, n_windows in db.execute("SELECT chunk_id, n_windows FROM index_chunks"):
        assert windows.get(chunk_id, 0) == n_windows
    without_vector = db.execute(
        "SELECT count(*) FROM index_windows w LEFT JOIN embeddings e"
        " ON e.text_hash = w.text_hash AND e.embedder_key = ? WHERE e.vector IS NULL",
        (key,),
    ).fetchone()[0]
    assert without_vector == 0


def test_unchanged_corpus_embeds_nothing(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    docs, embedder = copy_docs(tmp_path), HashedEmbedder()
    with Store(settings.db_path) as store:
        first = ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        embedded = len(embedder.embedded)
        second = ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        again = update_index(store, settings, open_embedder=using(embedder))
        assert first.index is not None and second.index is not None
        assert first.index.chunks_added == len(active_chunks(store)) > 0
        assert (
            first.index.windows_embedded == embedded > first.index.chunks_added
        )  # chunks are cut into windows
        assert (second.index.chunks_added, second.index.windows_embedded, second.index.chunks_removed) == (
            0,
            0,
            0,
        )
        assert (again.chunks_added, again.windows_embedded) == (0, 0)
        assert len(embedder.embedded) == embedded
        assert again.generation == first.index.generation  # nothing changed, so a running bot reloads nothing
        assert_index_matches_chunks(store.db, embedder.key)


def window_hashes(store: Store, chunk_ids: set[str]) -> set[str]:
    marks = ",".join("?" * len(chunk_ids))
    rows = store.db.execute(
        f"SELECT text_hash FROM index_windows WHERE chunk_id IN ({marks})", list(chunk_ids)
    )
    return {row[0] for row in rows}


def test_an_edited_file_embeds_only_its_changed_chunks(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    docs, embedder = copy_docs(tmp_path), HashedEmbedder()
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        before = active_chunks(store)
        page = docs / "guides" / "sdk-python.md"
        page.write_text(
            page.read_text() + "\n\n## Retries\n\nThe client retries a timed-out call zebrafish times.\n"
        )
        embedder.embedded.clear()
        report = ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        changed = active_chunks(store) - before
        assert changed and report.index is not None
        embedded = {hashlib.sha256(text.encode()).hexdigest() for text in embedder.embedded}
        assert embedded == window_hashes(store, changed)
        assert report.index.windows_embedded == len(embedded)
        assert report.index.windows_reused > 0  # the page's unchanged chunks were re-indexed, not re-embedded
        # the page's old version left the index and its new one came in: its unchanged chunks and the new one
        assert report.index.chunks_added == report.index.chunks_removed + len(changed)
        assert_index_matches_chunks(store.db, embedder.key)


def test_a_deleted_file_leaves_the_index(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    docs, embedder = copy_docs(tmp_path), HashedEmbedder()
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        (docs / "faq.md").unlink()
        report = ingest(store, settings, [str(docs)], open_embedder=using(embedder))
        assert report.index is not None and report.index.chunks_removed > 0
        assert_index_matches_chunks(store.db, embedder.key)
        left = store.scalar(
            "SELECT count(*) FROM chunks_fts f JOIN index_chunks ic ON ic.fts_rowid = f.rowid"
            " JOIN chunks c ON c.id = ic.chunk_id JOIN documents d ON d.id = c.document_id WHERE d.path = 'faq.md'"
        )
        assert left == 0
        assert store.scalar("SELECT count(*) FROM embeddings") == store.scalar(
            "SELECT count(DISTINCT text_hash) FROM index_windows"
        )  # the deleted page's vectors are dropped too


def test_windows_fit_the_embedder_and_cover_every_chunk(tmp_path: Path) -> None:
    settings = load_settings(
        workspace=tmp_path / "ws", retrieval_window_tokens=24, retrieval_window_overlap_tokens=4
    )
    embedder = HashedEmbedder(window_tokens=32)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=using(embedder))
        assert max(embedder.count_tokens(text) for text in embedder.embedded) <= 24
        for chunk_id, text in store.db.execute(
            "SELECT id, text FROM chunks WHERE status = 'active'"
        ).fetchall():
            spans = store.db.execute(
                "SELECT char_start, char_end FROM index_windows WHERE chunk_id = ? ORDER BY seq", (chunk_id,)
            ).fetchall()
            words = [match.span() for match in re.finditer(r"\w+", text)]
            assert spans[0][0] <= words[0][0] and spans[-1][1] >= words[-1][1]  # no tail is left out
            assert all(later[0] <= earlier[1] for earlier, later in itertools.pairwise(spans))


def test_an_index_built_with_another_embedder_is_refused_until_rebuilt(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    first, other = HashedEmbedder(name="model-a"), HashedEmbedder(name="model-b")
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=using(first))
        with pytest.raises(RetrievalIndexError) as refused:
            update_index(store, settings, open_embedder=using(other))
        assert str(refused.value) == (
            "the search index was built with model-a@32, the settings say model-b@32 — run `ftkit index --rebuild`"
            " (or set [retrieval] embedding_model back)"
        )
        with pytest.raises(RetrievalIndexError, match="built with model-a@32, the settings say model-b@32"):
            Retriever.open(store, settings, open_embedder=using(other))
        set_threshold(store, 0.4, {"balanced_accuracy": 0.8})
        rebuilt = update_index(store, settings, rebuild=True, open_embedder=using(other))
        assert rebuilt.rebuilt == "--rebuild" and rebuilt.chunks_added == len(active_chunks(store))
        state = index_state(store)
        assert state is not None and state.embedder_key == "model-b@32"
        assert state.threshold is None  # calibrated on the other model's scores
        assert store.scalar("SELECT count(*) FROM embeddings WHERE embedder_key = 'model-a@32'") == 0
        assert_index_matches_chunks(store.db, "model-b@32")


def test_an_ingest_whose_index_needs_a_rebuild_still_saves_its_chunks(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    docs = copy_docs(tmp_path)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)], open_embedder=using(HashedEmbedder(name="model-a")))
        (docs / "faq.md").unlink()
        report = ingest(store, settings, [str(docs)], open_embedder=using(HashedEmbedder(name="model-b")))
        assert report.index is None and report.documents_retired == 1


def test_without_an_embedder_the_index_is_lexical_and_gains_vectors_later(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        report = ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=no_embedder)
        assert report.index is not None
        assert (
            report.index.warning
            == f"the search index is lexical only (BM25, no dense search): {NO_EMBEDDER_MESSAGE}"
        )
        assert report.index.embedder_key == LEXICAL_ONLY and report.index.n_windows == 0
        hits = Retriever.open(store, settings).search("rotate an SDK key")
        assert hits and all(hit.dense_score is None for hit in hits)
        embedder = HashedEmbedder()
        upgraded = update_index(store, settings, open_embedder=using(embedder))
        assert upgraded.rebuilt == f"adding {embedder.key} vectors to a lexical-only index"
        assert upgraded.windows_embedded > 0
        assert_index_matches_chunks(store.db, embedder.key)
        with pytest.raises(ExtraMissingError):  # an index with vectors is never quietly made lexical
            update_index(store, settings, open_embedder=no_embedder)


def test_a_changed_window_size_rewindows_and_reuses_what_it_can(tmp_path: Path) -> None:
    embedder = HashedEmbedder()
    with Store(tmp_path / "ws" / "state.db") as store:
        ingest(
            store, load_settings(workspace=tmp_path / "ws"), [str(SAMPLE_DOCS)], open_embedder=using(embedder)
        )
        narrower = load_settings(workspace=tmp_path / "ws", retrieval_window_tokens=20)
        report = update_index(store, narrower, open_embedder=using(embedder))
        assert report.rebuilt == "windows changed (w1:32:16 → w1:20:10)"
        assert report.chunks_added == len(active_chunks(store)) and report.windows_embedded > 0
        assert_index_matches_chunks(store.db, embedder.key)


def test_the_threshold_is_stored_with_the_index_and_a_setting_overrides_it(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=using(HashedEmbedder()))
        retriever = Retriever.open(store, settings, open_embedder=using(HashedEmbedder()))
        assert retriever.threshold is None
        set_threshold(store, 0.37, {"positives_refused": 0.05, "negatives_refused": 0.9})
        state = index_state(store)
        assert state is not None and state.threshold == 0.37
        assert state.calibration == {"negatives_refused": 0.9, "positives_refused": 0.05}
        assert retriever.threshold == 0.37  # a running retriever sees a new calibration
        overridden = load_settings(workspace=tmp_path / "ws", retrieval_threshold=0.5)
        assert Retriever.open(store, overridden, open_embedder=using(HashedEmbedder())).threshold == 0.5
        assert state.line(0.5).endswith("threshold 0.5 (setting), generation " + str(state.generation))


def test_with_index_on_ingest_off_ingest_leaves_the_index_to_ftkit_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_RETRIEVAL_INDEX_ON_INGEST", "false")
    settings = load_settings(workspace=tmp_path / "ws")
    embedder = HashedEmbedder()
    with Store(settings.db_path) as store:
        report = ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=using(embedder))
        assert report.index is None and index_state(store) is None and not embedder.embedded
        assert update_index(store, settings, open_embedder=using(embedder)).chunks_added == len(
            active_chunks(store)
        )


INDEXER = """
import sys
from pathlib import Path
from finetune_kit.config import load_settings
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.hashed_embedder import HashedEmbedder

workspace, docs, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
settings = load_settings(workspace=workspace)
with Store(settings.db_path) as store:
    report = ingest(store, settings, [docs], open_embedder=lambda s: HashedEmbedder(delay_s=delay))
print(report.index.chunks_added if report.index else "no index")
"""


def run_indexer(workspace: Path, docs: Path, delay_s: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", INDEXER, str(workspace), str(docs), str(delay_s)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def generation_of(db_path: Path) -> int:
    try:
        with sqlite3.connect(db_path, timeout=5) as db:
            row = db.execute("SELECT value FROM index_meta WHERE key = 'generation'").fetchone()
    except sqlite3.OperationalError:  # not created yet
        return 0
    return int(row[0]) if row else 0


def test_kill_9_while_indexing_leaves_an_index_that_agrees_and_a_rerun_completes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for copy in ("a", "b", "c"):  # enough chunks for several batches
        shutil.copytree(SAMPLE_DOCS, docs / copy)
    workspace = tmp_path / "ws"
    process = run_indexer(workspace, docs, delay_s=0.05)
    deadline = time.monotonic() + 60
    while (
        generation_of(workspace / "state.db") < 3 and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with sqlite3.connect(workspace / "state.db") as db:
        indexed = db.execute("SELECT count(*) FROM index_chunks").fetchone()[0]
        active = db.execute("SELECT count(*) FROM chunks WHERE status = 'active'").fetchone()[0]
        assert 0 < indexed < active  # killed mid-way, after some batches were written
        fts = dict(db.execute("SELECT rowid, chunk_id FROM chunks_fts").fetchall())
        assert fts == dict(db.execute("SELECT fts_rowid, chunk_id FROM index_chunks").fetchall())
    rerun = run_indexer(workspace, docs, delay_s=0.0)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert int(stdout) == active - indexed  # the re-run indexed only what the killed one had not
    with sqlite3.connect(workspace / "state.db") as db:
        assert_index_matches_chunks(db, HashedEmbedder().key)
