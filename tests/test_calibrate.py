"""The "I don't know" threshold calibrated per workspace: positives its own questions, negatives checked."""

import pytest

from finetune_kit.config import load_settings
from finetune_kit.retrieval.calibrate import (
    Calibration,
    best_threshold,
    key_terms,
    parse_negatives,
    why_not_a_negative,
)
from finetune_kit.retrieval.types import Hit


def hit(text: str, heading: str = "Guide > Keys", title: str = "Guide") -> Hit:
    return Hit(
        rank=1,
        score=0.03,
        chunk_id="c1:x",
        path="guide.md",
        heading=heading,
        url="file:guide.md",
        title=title,
        text=text,
        snippet=text[:40],
        dense_score=0.5,
        lexical_score=1.0,
        dense_rank=1,
        lexical_rank=1,
    )


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
        "sign-o",
        "okta",
    }
    assert key_terms("How can I use it?", "Quillstack") == set()


@pytest.mark.parametrize(
    ("question", "top_text", "reason"),
    [
        ("How do I connect Quillstack to Salesforce?", "Connect the SDK with an SDK key.", None),
        (
            "How do I configure the flag cache?",
            "The cache holds flag values; configuration is in ftkit.toml.",
            "its top hit holds every key term",
        ),
        ("How can I use it?", "anything", "no key terms"),
        (
            "What does the documentation say about the Python SDK?",
            "anything",
            "near duplicate of a workspace question",
        ),
    ],
)
def test_generated_negatives_are_checked(question: str, top_text: str, reason: str | None) -> None:
    positives = ["What does the documentation say about Python SDK?"]

    assert why_not_a_negative(question, [hit(top_text)], positives, SETTINGS) == reason


def test_a_negative_with_no_hit_stands() -> None:
    assert why_not_a_negative("Is there a Quillstack app for Android?", [], [], SETTINGS) is None


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
