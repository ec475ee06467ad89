"""The hand-written retrieval questions for the sample docs: well-formed, and every gold path is a document ingest stores."""

import json
from pathlib import Path

import pytest

from finetune_kit.config import load_settings
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.conftest import REPO, SAMPLE_DOCS
from tests.hashed_embedder import HashedEmbedder

QUESTIONS = REPO / "tests" / "fixtures" / "retrieval-questions.jsonl"
FIELDS = {"id", "question", "reference", "gold_paths", "answerable"}


def load_questions() -> list[dict[str, object]]:
    """One object per non-empty line, in file order."""
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]


def test_ids_are_unique_and_fields_known() -> None:
    questions = load_questions()
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids))
    for q in questions:
        assert set(q) <= FIELDS, q["id"]
        assert isinstance(q["question"], str) and q["question"].strip(), q["id"]
        assert isinstance(q["answerable"], bool), q["id"]


def test_counts_answerable_and_unanswerable() -> None:
    questions = load_questions()
    assert sum(q["answerable"] is True for q in questions) == 30
    assert sum(q["answerable"] is False for q in questions) == 15


@pytest.mark.parametrize("question", load_questions(), ids=lambda q: str(q["id"]))
def test_answerable_ones_have_reference_and_gold(question: dict[str, object]) -> None:
    if question["answerable"]:
        assert isinstance(question["reference"], str) and question["reference"].strip()
        assert question["gold_paths"]
    else:
        assert question["gold_paths"] == []
        assert "reference" not in question


def test_gold_paths_are_documents_as_ingest_stores_them(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path / "ws")
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(SAMPLE_DOCS)], open_embedder=lambda _: HashedEmbedder())
        stored = {row[0] for row in store.db.execute("SELECT path FROM documents WHERE status = 'active'")}
    gold = {path for q in load_questions() for path in q["gold_paths"]}  # type: ignore[attr-defined]
    assert gold - stored == set()
