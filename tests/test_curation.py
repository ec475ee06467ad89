"""Near-duplicate questions across chunks and paraphrases of training questions, over real HTTP."""

import json
import random
import re
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.pipeline import run_build_dataset, run_generate_questions, run_ingest
from finetune_kit.stages.curate import NEAR_DUPLICATES, PARAPHRASES, PARAPHRASES_DROPPED
from finetune_kit.stages.dedupe import (
    DUPLICATE,
    candidate_pairs,
    jaccard,
    near_duplicates,
    shingles,
    signatures,
)
from finetune_kit.status import workspace_status
from finetune_kit.store import Store
from tests.conftest import TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder

DOCS = {
    "keys.md": "# Keys\n\nTo rotate an SDK key, run `quill keys rotate` in a terminal. The old key keeps working for"
    " 24 hours after that.\n",
    "security.md": "# Security\n\nKeys can be rotated from the dashboard by an owner. Audit logs are kept for 90 days"
    " on every plan.\n",
    "install.md": "# Install\n\nInstall the server with `pip install quill-server` on Linux or macOS. It needs"
    " Python 3.11 or newer.\n",
}
QUESTIONS = {  # per document: a question asked twice across the corpus, then one only this chunk answers
    "rotate an SDK key, run": ["How do I rotate an SDK key?", "How long does the old key keep working?"],
    "rotated from the dashboard": ["How can I rotate my SDK key?", "How long are audit logs kept?"],
    "pip install quill-server": ["How do I install the Quill server?", "Which Python version does it need?"],
}


def planted_responder(body: dict) -> Reply:
    """Fixed questions per chunk, paraphrases (one usable, one a copy), and docs_responder's answers and judge."""
    prompt = body["messages"][-1]["content"]
    if prompt.rstrip().endswith("Rewrites:\n1.") or "Rewrites:" in prompt:
        question = re.search(r"asked this:\n(.*)\n", prompt)[1]
        return Reply(content=f"Please explain: {question[0].lower()}{question[1:]}\n2. {question}")
    if prompt.rstrip().endswith("Questions:\n1."):
        found = next(qs for marker, qs in QUESTIONS.items() if marker in prompt)
        return Reply(content="\n".join(f"{i}. {q}" for i, q in enumerate(found, 1)))
    return docs_responder(body)


@pytest.fixture
def planted_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(planted_responder, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        yield fake


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def settings_for(tmp_path: Path, **flags: object) -> Settings:
    return load_settings(
        workspace=tmp_path / "ws",
        product="Quill",
        model="gpt-4o-mini",
        questions_per_chunk=2,
        min_examples=1,
        **flags,
    )


def questions_in(path: Path) -> list[str]:
    return [json.loads(line)["messages"][1]["content"] for line in path.read_text().splitlines()]


def test_a_question_asked_on_two_chunks_is_kept_once_from_the_chunk_that_answers_it(
    tmp_path: Path, docs: Path, planted_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, validation_fraction=0)
    run_ingest(settings, [str(docs)])
    run_generate_questions(settings)
    summary = run_build_dataset(settings)

    written = questions_in(settings.dataset_path / "train.jsonl")
    assert "How do I rotate an SDK key?" in written  # its chunk holds "rotate", "SDK" and "key"
    assert "How can I rotate my SDK key?" not in written
    assert len(written) == 5
    assert summary.dataset is not None and summary.dataset.curation[NEAR_DUPLICATES] == 1
    with Store(settings.db_path) as store:
        reason = store.scalar("SELECT reason FROM answers WHERE status = 'rejected'")
    assert reason == f"{DUPLICATE} — 1.00 like: How do I rotate an SDK key?"
    assert workspace_status(settings).answers == {"accepted": 5, DUPLICATE: 1}


def test_switched_off_every_question_is_kept_again(
    tmp_path: Path, docs: Path, planted_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, validation_fraction=0)
    run_ingest(settings, [str(docs)])
    run_generate_questions(settings)
    run_build_dataset(settings)
    sent = len(planted_llm.requests)

    off = settings_for(tmp_path, validation_fraction=0, dedupe_across_chunks=False)
    summary = run_build_dataset(off)

    assert len(questions_in(off.dataset_path / "train.jsonl")) == 6  # the mark is lifted
    assert summary.dataset is not None and summary.dataset.curation[NEAR_DUPLICATES] == 0
    assert len(planted_llm.requests) == sent  # deduplication costs no calls
    run_build_dataset(settings)
    assert len(questions_in(settings.dataset_path / "train.jsonl")) == 5


@pytest.mark.parametrize(("threshold", "dropped"), [(0.7, 1), (0.75, 0)])
def test_near_duplicates_at_a_threshold(threshold: float, dropped: int) -> None:
    texts = ["How do I install Quill on Linux?", "What is the way to install Quill on Linux?"]
    assert round(jaccard(shingles(texts[0]), shingles(texts[1])), 3) == 0.714
    assert len(near_duplicates(texts, ["a", "b"], [1.0, 0.0], threshold)) == dropped


def test_questions_of_one_chunk_are_never_deduplicated_here() -> None:
    texts = ["How do I rotate an SDK key?", "How can I rotate my SDK key?"]
    assert near_duplicates(texts, ["a", "a"], [0.0, 0.0], 0.5) == []


def test_minhash_finds_every_pair_that_comparing_all_pairs_finds() -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    base = [" ".join(rng.sample(words, 6)) for _ in range(150)]
    texts = base + [" ".join([*t.split()[:5], rng.choice(words)]) for t in base[:50]]  # 50 near copies
    sets = [shingles(t) for t in texts]
    exact = {(x, y) for x, y in combinations(range(len(texts)), 2) if jaccard(sets[x], sets[y]) >= 0.5}
    found = candidate_pairs(signatures(sets))
    assert len(exact) >= 50
    assert exact <= found  # recall 1.0 at Jaccard 0.5 on this set
    assert len(found) < len(texts) * (len(texts) - 1) / 2 / 10  # and a tenth of all pairs to confirm, at most


def test_paraphrases_go_to_training_only_and_near_copies_are_dropped(
    tmp_path: Path, docs: Path, planted_llm: FakeOpenAI
) -> None:
    settings = settings_for(tmp_path, paraphrases_per_question=2, validation_fraction=0.3)
    run_ingest(settings, [str(docs)])
    run_generate_questions(settings)
    summary = run_build_dataset(settings)

    train = questions_in(settings.dataset_path / "train.jsonl")
    validation = questions_in(settings.dataset_path / "validation.jsonl")
    originals = [q for q in train if not q.startswith("Please explain")]
    assert sorted(train) == sorted(originals + [f"Please explain: {q[0].lower()}{q[1:]}" for q in originals])
    assert validation and not any(q.startswith("Please explain") for q in validation)
    asked = [
        b["messages"][0]["content"]
        for b in planted_llm.requests
        if "Rewrites:" in b["messages"][0]["content"]
    ]
    assert sorted(re.search(r"asked this:\n(.*)\n", p)[1] for p in asked) == sorted(originals)
    assert summary.dataset is not None
    assert summary.dataset.curation[PARAPHRASES] == len(originals)
    assert summary.dataset.curation[PARAPHRASES_DROPPED] == len(originals)  # each exact copy

    sent = len(planted_llm.requests)
    again = run_build_dataset(settings)
    assert len(planted_llm.requests) == sent
    assert questions_in(settings.dataset_path / "train.jsonl") == train
    assert again.dataset is not None and again.dataset.curation[PARAPHRASES] == len(originals)


def test_no_paraphrase_is_asked_for_by_default(tmp_path: Path, docs: Path, planted_llm: FakeOpenAI) -> None:
    settings = settings_for(tmp_path)
    run_ingest(settings, [str(docs)])
    run_generate_questions(settings)
    run_build_dataset(settings)
    assert not any("Rewrites:" in b["messages"][0]["content"] for b in planted_llm.requests)
