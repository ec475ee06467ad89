"""Shared fixtures: a fake OpenAI endpoint over real HTTP, an isolated environment, a CLI runner."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fake_openai import FakeOpenAI, docs_responder

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DOCS = REPO / "data" / "sample-docs"
TINY_DOCS = REPO / "tests" / "fixtures" / "tiny-docs"
TEST_KEY = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's keys, config or workspace."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "FTKIT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    import os

    for name in [n for n in os.environ if n.startswith("FTKIT_")]:
        monkeypatch.delenv(name)
    # `ftkit run` stops at the dataset unless a test is about training (test_run_trains sets it back)
    monkeypatch.setenv("FTKIT_TRAIN_AFTER_DATASET", "false")
    # ingest leaves the search index to `ftkit index` unless a test is about the index (those set it back): the
    # local embedder would otherwise embed every corpus every test ingests
    monkeypatch.setenv("FTKIT_RETRIEVAL_INDEX_ON_INGEST", "false")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """A deterministic OpenAI-compatible endpoint that ftkit is pointed at through the environment."""
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        yield fake


@pytest.fixture
def runner() -> CliRunner:
    """Invokes the ftkit CLI in-process."""
    return CliRunner()
