import pytest

from finetune_kit.stages.questions import Candidate, judge, select_questions, split_list_items

THRESHOLD = 0.85


@pytest.mark.parametrize(
    ("output", "items"),
    [
        pytest.param(
            "1. How do I install Acme?\n2. What port does the server use?\n3. How do I reset my password?",
            ["How do I install Acme?", "What port does the server use?", "How do I reset my password?"],
            id="numbered-dot",
        ),
        pytest.param(
            "1) How do I install Acme?\n2) What port does the server use?",
            ["How do I install Acme?", "What port does the server use?"],
            id="numbered-paren",
        ),
        pytest.param(
            "Q1: How do I install Acme?\nQ2: What port does the server use?",
            ["How do I install Acme?", "What port does the server use?"],
            id="q-colon",
        ),
        pytest.param(
            "Question 1: How do I install Acme?\nQuestion 2: What port does the server use?",
            ["How do I install Acme?", "What port does the server use?"],
            id="question-n-colon",
        ),
        pytest.param(
            "1.How do I install Acme?\n10. What port does the server use?\n2 - Where are the logs kept?",
            ["How do I install Acme?", "What port does the server use?", "Where are the logs kept?"],
            id="odd-numbering",
        ),
        pytest.param(
            "- How do I install Acme?\n* What port does the server use?\n• Where are the logs?\n+ Who can log in?",
            [
                "How do I install Acme?",
                "What port does the server use?",
                "Where are the logs?",
                "Who can log in?",
            ],
            id="bullets",
        ),
        pytest.param(
            "1. How do I configure the\n   proxy for Acme on Linux?\n2. What port does the server use?",
            ["How do I configure the proxy for Acme on Linux?", "What port does the server use?"],
            id="wrapped-continuation",
        ),
        pytest.param(
            " How do I install Acme?\n2. What port does the server use?\n3. Where are the logs kept?",
            ["How do I install Acme?", "What port does the server use?", "Where are the logs kept?"],
            id="first-item-without-number",
        ),
        pytest.param(
            '1. **How do I install Acme?**\n2. "What port does the server use?"\n3. > Where are the logs kept?\n'
            "4. _Who can log in?_\n5. “Is there a dark mode?”",
            [
                "How do I install Acme?",
                "What port does the server use?",
                "Where are the logs kept?",
                "Who can log in?",
                "Is there a dark mode?",
            ],
            id="markdown-decoration",
        ),
        pytest.param(
            "1. How do I install Acme?\n2. What port does the server use?\n\n"
            "These questions cover the installation section.\nI hope they help!",
            ["How do I install Acme?", "What port does the server use?"],
            id="prose-after-blank-line",
        ),
        pytest.param(
            "1. How do I install Acme?\n2. What port does the server use?\nThese questions cover installation.",
            ["How do I install Acme?", "What port does the server use?"],
            id="prose-right-after-list",
        ),
        pytest.param(
            "1. How do I install Acme?\n\nAnother thought about the docs.\n2. What port does the server use?",
            ["How do I install Acme?", "What port does the server use?"],
            id="prose-between-items",
        ),
        pytest.param(
            "1. How do I install Acme?\n\n\n2. What port does the server use?\n",
            ["How do I install Acme?", "What port does the server use?"],
            id="blank-lines",
        ),
        pytest.param("", [], id="empty"),
        pytest.param(
            "1.\n2. **\n3. What port does the server use?",
            ["What port does the server use?"],
            id="empty-items",
        ),
    ],
)
def test_split_list_items(output: str, items: list[str]) -> None:
    assert split_list_items(output) == items


def test_preamble_becomes_an_item_that_is_then_rejected() -> None:
    output = "Here are three questions:\n1. How do I install Acme?\n2. What port does the server use?"

    assert select_questions(output, wanted=3, already=[], threshold=THRESHOLD) == [
        Candidate("Here are three questions:", "not a question (no question mark)"),
        Candidate("How do I install Acme?"),
        Candidate("What port does the server use?"),
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("How do I install Acme?", None),
        ("Tell me about ports.", "not a question (no question mark)"),
        ("What port does Acme use? And how do I change it?", "several questions in one"),
        ("Ports?", "too short (under 3 words)"),
        ("Which port?", "too short (under 3 words)"),
        (" ".join(["word"] * 60) + "?", None),
        (" ".join(["word"] * 61) + "?", "too long (over 60 words)"),
        ("What does the documentation above say about ports?", "echoes the prompt"),
        ("Questions: what is Acme?", "echoes the prompt"),
        ("Answer: what is Acme for?", "echoes the prompt"),
        ("Can you write them one per line?", "echoes the prompt"),
        ("Should this be a numbered list?", "echoes the prompt"),
    ],
)
def test_judge_alone(text: str, reason: str | None) -> None:
    assert judge(text, [], THRESHOLD) == reason


@pytest.mark.parametrize(
    ("text", "kept", "reason"),
    [
        ("How do I install Acme on Linux?", ["How do I install Acme on Linux?"], "duplicate"),
        ("how do I install acme on linux ?", ["How do I install Acme on Linux?"], "duplicate"),
        ("How can I install Acme on Linux?", ["How do I install Acme on Linux?"], "near duplicate"),
        ("How do I uninstall Acme on Windows?", ["How do I install Acme on Linux?"], None),
    ],
)
def test_judge_against_kept(text: str, kept: list[str], reason: str | None) -> None:
    assert judge(text, kept, THRESHOLD) == reason


def test_near_duplicate_threshold_is_used() -> None:
    kept = ["How do I install Acme on Linux?"]

    assert judge("How can I install Acme on Linux?", kept, 0.95) is None
    assert judge("How can I install Acme on Linux?", kept, 0.90) == "near duplicate"


REALISTIC = """1. How do I install Acme on Linux?
2. How do I install Acme on Linux?
3. How do I install Acme on linux ?
4. How can I install Acme on Linux?
5. What port does Acme use? And how do I change it?
6. What does the documentation above say about ports?
7. Ports?
8. Tell me about ports.
9. Which file stores the Acme configuration?
10. How do I rotate the Acme logs?"""


def test_select_questions_gives_every_reject_a_reason() -> None:
    assert select_questions(REALISTIC, wanted=10, already=[], threshold=THRESHOLD) == [
        Candidate("How do I install Acme on Linux?"),
        Candidate("How do I install Acme on Linux?", "duplicate"),
        Candidate("How do I install Acme on linux ?", "duplicate"),
        Candidate("How can I install Acme on Linux?", "near duplicate"),
        Candidate("What port does Acme use? And how do I change it?", "several questions in one"),
        Candidate("What does the documentation above say about ports?", "echoes the prompt"),
        Candidate("Ports?", "too short (under 3 words)"),
        Candidate("Tell me about ports.", "not a question (no question mark)"),
        Candidate("Which file stores the Acme configuration?"),
        Candidate("How do I rotate the Acme logs?"),
    ]


def test_select_questions_stops_once_wanted_are_accepted() -> None:
    judged = select_questions(REALISTIC, wanted=2, already=[], threshold=THRESHOLD)

    assert [c.text for c in judged if c.accepted] == [
        "How do I install Acme on Linux?",
        "Which file stores the Acme configuration?",
    ]
    assert len(judged) == 9


def test_already_accepted_count_toward_wanted_and_dedup() -> None:
    already = ["Which file stores the Acme configuration?", "Where does Acme write its logs?"]
    output = (
        "1. Which file stores the Acme configuration?\n"
        "2. How do I install Acme on Linux?\n"
        "3. How do I rotate the Acme logs?"
    )

    assert select_questions(output, wanted=3, already=already, threshold=THRESHOLD) == [
        Candidate("Which file stores the Acme configuration?", "duplicate"),
        Candidate("How do I install Acme on Linux?"),
    ]


def test_nothing_is_judged_when_already_has_enough() -> None:
    assert (
        select_questions("1. How do I install Acme?", wanted=1, already=["Where are logs?"], threshold=0.85)
        == []
    )


@pytest.mark.parametrize(
    ("truncated", "expected"),
    [
        (True, [Candidate("How do I install Acme?")]),
        (
            False,
            [
                Candidate("How do I install Acme?"),
                Candidate("What port does the ser", "not a question (no question mark)"),
            ],
        ),
    ],
)
def test_truncated_last_item_is_dropped(truncated: bool, expected: list[Candidate]) -> None:
    output = "1. How do I install Acme?\n2. What port does the ser"

    assert (
        select_questions(output, wanted=3, already=[], threshold=THRESHOLD, truncated=truncated) == expected
    )


def test_truncated_keeps_a_complete_last_item() -> None:
    output = "1. How do I install Acme?\n2. What port does the server use?"

    judged = select_questions(output, wanted=3, already=[], threshold=THRESHOLD, truncated=True)

    assert [c.text for c in judged] == ["How do I install Acme?", "What port does the server use?"]
