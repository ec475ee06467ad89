"""Hybrid search: user text is never FTS syntax, fusion and MMR as documented, the CLI's table and JSON."""

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import VagueQueryError
from finetune_kit.retrieval.search import Retriever, fts_query, query_terms, relevance
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.conftest import REPO, SAMPLE_DOCS
from tests.hashed_embedder import HashedEmbedder
from tests.test_retrieval_index import no_embedder, using


@pytest.fixture(autouse=True)
def index_on_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the index that ingest keeps current (conftest turns that off for the others)."""
    monkeypatch.setenv("FTKIT_RETRIEVAL_INDEX_ON_INGEST", "true")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def retriever(workspace: Path) -> Iterator[Retriever]:
    settings = load_settings(workspace=workspace)
    embedder = HashedEmbedder()
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=using(embedder))
        yield Retriever.open(store, settings, open_embedder=using(embedder))


@pytest.mark.parametrize(
    "query",
    ['"', 'NEAR("sdk" key, 2)', "rotate*", "key OR", "OR", "sdk AND NOT key", "title:key", "^key", "-key +sdk",
     "{sdk key}", "key\x00sdk", "café ünïcödé 日本語 ключ", "'; DROP TABLE chunks; --", "sdk_key"],
)  # fmt: skip
def test_query_syntax_is_never_passed_to_fts(workspace: Path, query: str) -> None:
    settings = lexical_workspace(workspace)
    with Store(settings.db_path) as store:
        retriever = Retriever.open(store, settings)
        words = query_terms_or_none(query)
        if words is None:
            with pytest.raises(VagueQueryError, match="too vague"):
                retriever.search(query)
            return
        hits = retriever.search(query, k=10)  # BM25 alone: the same hits as the query's words, syntax or not
        assert [hit.chunk_id for hit in hits] == [
            hit.chunk_id for hit in retriever.search(" ".join(words), k=10)
        ]
        assert (
            store.scalar("SELECT count(*) FROM chunks WHERE status = 'active'") == 28
        )  # nothing was dropped


def query_terms_or_none(query: str) -> list[str] | None:
    try:
        return query_terms(query)
    except VagueQueryError:
        return None


def test_fts_expression_quotes_every_term() -> None:
    assert query_terms('How do I rotate an "SDK" key? NEAR(key*)') == ["rotate", "sdk", "key", "near"]
    assert fts_query(["rotate", "sdk"]) == '"rotate" OR "sdk"'


@pytest.mark.parametrize("query", ["", "   ", "what is it?", "How do I do this?", "?!*"])
def test_a_query_of_only_stop_words_is_too_vague(retriever: Retriever, query: str) -> None:
    with pytest.raises(VagueQueryError, match="too vague"):
        retriever.search(query)


def test_a_100_kb_query_is_cut_not_fatal(retriever: Retriever, caplog: pytest.LogCaptureFixture) -> None:
    query = "How do I rotate an SDK key? " + "lorem ipsum " * 9000
    with caplog.at_level(logging.WARNING, logger="finetune_kit.retrieval.search"):
        hits = retriever.search(query)
    assert len(hits) == 4
    assert caplog.messages == [
        f"the query has {len(query)} characters: searching its first 2000 (max_query_chars)"
    ]


def test_hits_are_fused_by_reciprocal_rank(retriever: Retriever) -> None:
    hits = retriever.search("rotate the SDK key of an environment", k=10)
    assert [hit.rank for hit in hits] == list(range(1, 11))
    for hit in hits:
        expected = sum(1 / (60 + rank) for rank in (hit.lexical_rank, hit.dense_rank) if rank is not None)
        assert hit.score == pytest.approx(expected)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert relevance(hits) == max(hit.dense_score for hit in hits if hit.dense_score is not None)
    assert all(" ".join(hit.snippet.strip("…").split()) in " ".join(hit.text.split()) for hit in hits)


def test_heading_and_title_are_searched(retriever: Retriever) -> None:
    hit = retriever.search("Troubleshooting", k=1)[0]
    assert (hit.path, hit.title) == ("troubleshooting.md", "Troubleshooting")
    assert hit.heading.startswith("Troubleshooting")


def test_mmr_keeps_the_best_hit_and_returns_k_distinct_chunks(retriever: Retriever) -> None:
    plain = retriever.search("SDK key environment", k=4, mmr=False)
    diverse = retriever.search("SDK key environment", k=4, mmr=True)
    assert diverse[0].chunk_id == plain[0].chunk_id
    assert len({hit.chunk_id for hit in diverse}) == 4


ADDER = """
import sys
from pathlib import Path
from finetune_kit.config import load_settings
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.hashed_embedder import HashedEmbedder

settings = load_settings(workspace=Path(sys.argv[1]))
with Store(settings.db_path) as store:
    ingest(store, settings, [sys.argv[2]], open_embedder=lambda s: HashedEmbedder())
"""


def test_a_running_retriever_sees_chunks_another_process_added(tmp_path: Path, workspace: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, docs)
    settings = load_settings(workspace=workspace)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)], open_embedder=using(HashedEmbedder()))
        retriever = Retriever.open(store, settings, open_embedder=using(HashedEmbedder()))
        assert all("axolotl" not in hit.text for hit in retriever.search("axolotl pagination"))
        (docs / "new.md").write_text(
            "# Axolotl mode\n\nAxolotl mode turns on pagination for every flag list.\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", ADDER, str(workspace), str(docs)], env=env, check=True)
        hit = retriever.search("axolotl pagination")[0]
        assert (hit.path, hit.lexical_rank, hit.dense_rank) == ("new.md", 1, 1)


def lexical_workspace(workspace: Path) -> Settings:
    """A workspace indexed without an embedder, so the CLI searches it with BM25 alone."""
    settings = load_settings(workspace=workspace)
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=no_embedder)
    return settings


def test_search_prints_a_table(runner: CliRunner, workspace: Path) -> None:
    lexical_workspace(workspace)
    result = runner.invoke(
        app, ["search", "rotate an SDK key", "-k", "2", "-w", str(workspace)], terminal_width=300
    )
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")] == [
        "rank", "score", "path", "heading", "URL", "snippet"
    ]  # fmt: skip
    assert "file://" in result.output and " 2 " in result.output and " 3 " not in result.output


def test_search_json_has_every_field(runner: CliRunner, workspace: Path) -> None:
    settings = lexical_workspace(workspace)
    result = runner.invoke(app, ["search", "rotate an SDK key", "--json", "-w", str(workspace)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == settings.retrieval.k
    assert set(hits[0]) == {"rank", "score", "path", "heading", "url", "snippet", "chunk_id", "text"}
    with Store(settings.db_path) as store:
        text = store.scalar("SELECT text FROM chunks WHERE id = ?", (hits[0]["chunk_id"],))
    assert hits[0]["text"] == text and hits[0]["rank"] == 1


@pytest.mark.parametrize("indexed", [False, True])
def test_search_without_an_index_says_to_run_ftkit_index(
    runner: CliRunner, workspace: Path, indexed: bool
) -> None:
    if indexed:  # a workspace whose index holds nothing: every document was deleted
        settings = lexical_workspace(workspace)
        with Store(settings.db_path) as store:
            store.db.execute("UPDATE chunks SET status = 'retired'")
    result = runner.invoke(app, ["search", "sdk key", "-w", str(workspace)])
    assert result.exit_code == 1
    state = "empty" if indexed else "missing"
    assert result.output == f"Error: {workspace}: the search index is {state} — run `ftkit index`\n"


def test_search_refuses_a_vague_query_in_one_line(runner: CliRunner, workspace: Path) -> None:
    lexical_workspace(workspace)
    result = runner.invoke(app, ["search", "what is it", "-w", str(workspace)])
    assert result.exit_code == 1
    assert (
        result.output.startswith("Error: the query 'what is it' is too vague")
        and result.output.count("\n") == 1
    )


def test_status_shows_the_index(runner: CliRunner, workspace: Path) -> None:
    lexical_workspace(workspace)
    result = runner.invoke(app, ["status", "-w", str(workspace)], terminal_width=300)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "search index" in line)
    assert "28 chunks, 0 windows, lexical-only, threshold" in line


TINY_DOCS = REPO / "tests" / "fixtures" / "tiny-docs"


def test_ingest_indexes_with_the_local_embedder_and_search_finds_the_answer(
    runner: CliRunner, workspace: Path
) -> None:
    ingested = runner.invoke(app, ["ingest", str(TINY_DOCS), "-w", str(workspace)])
    assert ingested.exit_code == 0, ingested.output
    assert "(all-MiniLM-L6-v2@254)" in ingested.output and " 0 reused" in ingested.output
    again = runner.invoke(app, ["index", "-w", str(workspace)])
    assert again.exit_code == 0, again.output
    assert "Index: 0 chunks added, 0 removed; 0 windows embedded, 0 reused" in again.output
    found = runner.invoke(
        app, ["search", "which port does the server listen on", "--json", "-w", str(workspace)]
    )
    assert found.exit_code == 0, found.output
    top = json.loads(found.output)[0]
    assert top["path"] == "install.md" and "7410" in top["text"]
    refused = runner.invoke(
        app, ["search", "server port", "-w", str(workspace)], env={"FTKIT_RETRIEVAL_WINDOW_TOKENS": "128"}
    )
    assert refused.exit_code == 1
    assert refused.output == (
        "Error: the search index was built with all-MiniLM-L6-v2@254, the settings say all-MiniLM-L6-v2@128"
        " — run `ftkit index --rebuild`\n"
    )


def test_the_dense_top_is_the_stable_sort_of_every_score_cut_to_n() -> None:
    """The partition that replaces a full sort keeps its order: best first, ties in index order."""
    import numpy as np

    from finetune_kit.retrieval.search import _top

    rng = np.random.default_rng(1)
    for n in (1, 4, 100):
        for size in (3, 50, 2000):
            scores = rng.integers(0, 20, size).astype(np.float32)  # many ties
            assert list(_top(scores, n)) == list(np.argsort(-scores, kind="stable")[:n])
