"""The unknown-terms signal of "I don't know": what a question names that the docs never do."""

import pytest

from finetune_kit.retrieval.terms import (
    KnownWords,
    capitalised_words,
    common_english,
    key_terms,
    unknown_terms,
)

DOCS = {
    "flag",
    "flags",
    "rollout",
    "server",
    "port",
    "percentage",
    "archived",
    "archive",
    "production",
    "sdk",
}
COMMON = {
    "point",
    "roll",
    "launch",
    "day",
    "back",
    "charts",
    "connect",
    "chart",
    "accidentally",
    "production",
    "official",
    "cluster",
    "helm",
    "archived",
    "turn",
}


def docs_have(word: str) -> bool:
    return word in DOCS


def unknown(question: str) -> list[str]:
    return unknown_terms(question, "Quillstack", docs_have, KnownWords(COMMON, lambda: DOCS))


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("How do I connect Quillstack to Salesforce?", ["salesforce"]),  # not a common word, not in the docs
        ("Does Quillstack have an official Helm chart for a cluster?", ["helm"]),  # common, but capitalised
        (
            "what does the --canary-weight option of flag rollout do?",
            ["canary-weight"],
        ),  # shaped like an option
        ("point QUILL_REDIS_URL at the server", ["quill_redis_url"]),
        ("how do I turn a flag on", []),  # every term in the docs or common
        ("accidentaly archived a flag, can I get it back?", []),  # a typo of a common word
        (
            "the flag rolout in prodution",
            [],
        ),  # a typo of a docs word; prodution is one edit from production
        ("roll out to 100% at 9am on launch day v2", []),  # numbers and times never count
        ("Helm charts?", []),  # a capital that starts a sentence is no evidence, and chart is common
    ],
)
def test_unknown_terms_are_specific_names_the_docs_never_use(question: str, expected: list[str]) -> None:
    assert unknown(question) == expected


def test_without_a_common_word_list_only_capitals_and_identifiers_count() -> None:
    words = KnownWords((), lambda: DOCS)
    assert unknown_terms("connect to salesforce", "Quillstack", docs_have, words) == []
    assert unknown_terms("connect to Salesforce", "Quillstack", docs_have, words) == ["salesforce"]


def test_the_product_name_and_sentence_starts_are_not_capitalised_terms() -> None:
    assert capitalised_words("Quillstack is fine. Does it run on Windows? Yes, with PHP.") == {
        "windows",
        "php",
    }
    assert "quillstack" not in key_terms("Does Quillstack run on Windows?", "Quillstack")


def test_the_bundled_vocabulary_holds_common_words_and_not_product_names() -> None:
    common = common_english()
    if not common:
        pytest.skip("the rag extra is not installed")
    assert {"connect", "password", "chart"} <= common and not {"salesforce", "kubectl", "terraform"} & common
