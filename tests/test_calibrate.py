"""The "I don't know" threshold calibrated per workspace: positives its own questions, negatives checked."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ExtraMissingError
from finetune_kit.pipeline import run_generate_questions
from finetune_kit.retrieval.calibrate import (
    OFF_TOPIC,
    Calibration,
    best_threshold,
    calibrate,
    calibrate_workspace,
    key_terms,
    parse_negatives,
    why_not_a_negative,
)
from finetune_kit.retrieval.index import index_state, set_threshold, update_index
from finetune_kit.retrieval.search import Retriever, relevance
from finetune_kit.retrieval.types import Embedder
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY, TINY_DOCS
from tests.fake_openai import FakeOpenAI, Reply, _last_user_text, docs_responder

SETTINGS = load_settings(product="Quillstack")


def test_separable_scores_get_the_midpoint_of_the_gap() -> None:
    choice = best_threshold([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])

    assert choice.threshold == pytest.approx(0.4)
    assert (choice.balanced_accuracy, choice.positives_refused, choice.negatives_refused) == (1.0, 0.0, 1.0)


def test_overlapping_scores_get_the_best_balanced_accuracy() -> None:
    positives = [0.25, 0.5, 0.6, 0.7]  # one answerable question scores like the off-topic ones
    negatives = [0.1, 0.2, 0.3, 0.55]

    choice = best_threshold(positives, negatives)

    assert choice.threshold == pytest.approx(0.4)  # refuses 0.25 and 0.3: 3/4 of each side right
    assert choice.balanced_accuracy == pytest.approx(0.75)
    assert (choice.positives_refused, choice.negatives_refused) == (0.25, 0.75)


def test_balanced_accuracy_weighs_both_sides_alike() -> None:
    # many more negatives than positives: plain accuracy would refuse everything
    choice = best_threshold([0.4, 0.45], [0.1] * 20 + [0.5] * 5)

    assert choice.positives_refused == 0.0
    assert choice.threshold < 0.4


def test_key_terms_leave_out_the_product_and_generic_words() -> None:
    assert key_terms("Does Quillstack support single sign-on with Okta?", "Quillstack") == {
        "single",
        "sign-on",
        "okta",
    }
    assert key_terms("What does the documentation say about it?", "Quillstack") == set()


DOCS_WORDS = {"flag", "cache", "configure", "sdk", "key", "python"}


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        ("How do I connect Quillstack to Salesforce?", None),  # the docs never say Salesforce
        ("How do I configure the flag cache?", "the docs use every key term"),
        ("How can I use it?", "no key terms"),
        ("What does the documentation say about the Python SDK?", "near duplicate of a workspace question"),
    ],
)
def test_generated_negatives_are_checked(question: str, reason: str | None) -> None:
    positives = ["What does the documentation say about Python SDK?"]

    assert why_not_a_negative(question, positives, SETTINGS, DOCS_WORDS.__contains__) == reason


def test_negatives_parsed_from_a_rambling_list() -> None:
    output = (
        "Sure! Here are some questions:\n1. Does Quillstack integrate with Salesforce?\n"
        "2. Does Quillstack integrate with Salesforce?\n3. okta\n"
        "4. Can I run Quillstack on a Raspberry Pi?\nThese are all great questions."
    )

    assert parse_negatives(output, SETTINGS) == [
        "Does Quillstack integrate with Salesforce?",
        "Can I run Quillstack on a Raspberry Pi?",
    ]


def test_the_first_item_may_lack_its_number() -> None:
    output = (
        "Does Quillstack integrate with Zapier?\n2. Is there a Quillstack app for Android?\n3. Can I export"
    )

    assert parse_negatives(output, SETTINGS) == [
        "Does Quillstack integrate with Zapier?",
        "Is there a Quillstack app for Android?",
    ]


def test_stats_hold_both_rates_and_the_counts() -> None:
    report = Calibration(
        threshold=0.3,
        balanced_accuracy=0.9,
        answerable_refused=0.05,
        unanswerable_refused=0.85,
        n_positives=40,
        n_negatives=30,
    )

    stats = report.stats()

    assert "threshold" not in stats
    assert (stats["answerable_refused"], stats["unanswerable_refused"]) == (0.05, 0.85)
    assert (stats["n_positives"], stats["n_negatives"]) == (40, 30)
    assert stats["calibrated_at"]


# --- on the sample docs, through the real index and a fake model over HTTP ---------------------------------

PLANTED_UNANSWERABLE = "Does Quillstack have an official Android app for managing flags?"
PLANTED_ANSWERABLE = "How do I archive a flag with the quill CLI?"  # the docs answer it: must be dropped


def negatives_responder(body: dict) -> Reply:
    """Questions the docs cannot answer (and one they can) when asked for them; the docs responder otherwise."""
    if "do NOT describe" in _last_user_text(body):
        questions = [PLANTED_UNANSWERABLE, PLANTED_ANSWERABLE, "Can I log in to Quillstack with Okta?"]
        return Reply(content="\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1)))
    return docs_responder(body)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(negatives_responder, api_key=TEST_KEY) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        for name, value in {"PROVIDER": "openai", "MODEL": "fake-model", "PRODUCT": "Quillstack"}.items():
            monkeypatch.setenv(f"FTKIT_{name}", value)
        yield server


def lexical_only(settings: Settings) -> Embedder:
    """No local embedder: the index is BM25 only and relevance is the best BM25 score (MiniLM takes minutes here)."""
    raise ExtraMissingError("no local embedder in this test")


def workspace(docs: Path, questions: bool = True) -> Settings:
    """`docs` ingested and indexed in ./ws, and (unless not `questions`) questions generated by the fake."""
    settings = load_settings(workspace=Path("ws"))
    with Store(settings.db_path) as store:
        ingest(store, settings, [str(docs)], open_embedder=lexical_only)
        update_index(store, settings, open_embedder=lexical_only)  # conftest leaves it to `ftkit index`
    if questions:
        run_generate_questions(settings)
    return settings


def test_calibration_separates_off_topic_from_the_workspace_questions(
    fake: FakeOpenAI,
) -> None:
    settings = workspace(SAMPLE_DOCS)

    with Store(settings.db_path) as store:
        report = calibrate(store, settings, open_embedder=lexical_only)
        state = index_state(store)
        retriever = Retriever.open(store, settings, lexical_only)
        off_topic = [relevance(retriever.search(q)) for q in OFF_TOPIC]

    assert report.threshold is not None and report.reason is None
    assert state is not None and state.threshold == pytest.approx(report.threshold)
    assert report.n_positives >= 10 and report.n_off_topic == len(OFF_TOPIC)
    assert report.dropped == {"the docs use every key term": 1}  # the planted answerable one
    assert (report.n_generated, report.n_generated_kept) == (3, 2)
    assert sum(score < report.threshold for score in off_topic) / len(off_topic) >= 0.8
    assert report.answerable_refused is not None and report.answerable_refused <= 0.2
    assert report.unanswerable_refused is not None and report.unanswerable_refused >= 0.8
    assert report.n_answerable_refused == round(report.answerable_refused * report.n_positives)
    assert report.n_unanswerable_refused == round(report.unanswerable_refused * report.n_negatives)
    assert state.calibration is not None and state.calibration["n_positives"] == report.n_positives
    assert f"({report.n_unanswerable_refused}/{report.n_negatives}: 24 off-topic, 2 of 3 generated kept)" in (
        report.line()
    )


def test_a_second_calibration_asks_the_model_nothing(fake: FakeOpenAI) -> None:
    settings = workspace(SAMPLE_DOCS)
    with Store(settings.db_path) as store:
        first = calibrate(store, settings, open_embedder=lexical_only)
        asked = len(fake.requests)
        second = calibrate(store, settings, open_embedder=lexical_only)

    assert len(fake.requests) == asked
    assert second.threshold == first.threshold


def test_too_few_positives_stores_no_threshold(fake: FakeOpenAI) -> None:
    settings = workspace(TINY_DOCS, questions=False)  # indexed, but no generated questions

    with Store(settings.db_path) as store:
        report = calibrate(store, settings, open_embedder=lexical_only)
        state = index_state(store)

    assert report.threshold is None
    assert report.reason is not None and "ftkit generate-questions" in report.reason
    assert state is None or state.threshold is None
    assert fake.requests == []  # no negatives were asked for


def test_a_failed_generation_still_calibrates_on_the_built_in_questions(fake: FakeOpenAI) -> None:
    settings = workspace(SAMPLE_DOCS)
    fake.responder = lambda body: Reply(status=400, content="model overloaded")

    with Store(settings.db_path) as store:
        report = calibrate(store, settings, open_embedder=lexical_only)

    assert report.generation_error is not None
    assert report.n_generated == 0 and report.n_off_topic == len(OFF_TOPIC)
    assert report.threshold is not None


def test_calibrate_workspace_only_if_uncalibrated_leaves_a_stored_threshold(fake: FakeOpenAI) -> None:
    settings = workspace(SAMPLE_DOCS)
    with Store(settings.db_path) as store:
        set_threshold(store, 0.5, {"by": "hand"})

    assert calibrate_workspace(settings, only_if_uncalibrated=True) is None
    with Store(settings.db_path) as store:
        assert index_state(store).threshold == 0.5
    assert fake.requests[-1:] and "do NOT describe" not in _last_user_text(fake.requests[-1])
