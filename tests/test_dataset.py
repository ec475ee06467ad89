import json
from pathlib import Path
from typing import Any

import pytest

from finetune_kit.stages.dataset import (
    Example,
    ValidationReport,
    example_tokens,
    split_by_chunk,
    to_record,
    validate_jsonl,
    write_jsonl,
)

CHUNKS = [f"c{i:03d}" for i in range(50)]
HI = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
EXAMPLE = Example(chunk_id="c001", question="How do I install Acme?", answer="Run `pip install acme`.")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_split_is_deterministic_for_a_seed() -> None:
    assert split_by_chunk(CHUNKS, 0.2, seed=7) == split_by_chunk(list(CHUNKS), 0.2, seed=7)


def test_split_differs_for_another_seed() -> None:
    assert split_by_chunk(CHUNKS, 0.2, seed=1) != split_by_chunk(CHUNKS, 0.2, seed=2)


def test_split_ignores_order_and_repeats() -> None:
    shuffled = list(reversed(CHUNKS)) + CHUNKS[:10]

    assert split_by_chunk(shuffled, 0.2, seed=3) == split_by_chunk(CHUNKS, 0.2, seed=3)


def test_split_picks_from_the_given_chunks() -> None:
    assert split_by_chunk(CHUNKS, 0.3, seed=0) <= set(CHUNKS)


@pytest.mark.parametrize(
    ("n_chunks", "fraction", "size"),
    [
        (50, 0.2, 10),
        (50, 0.1, 5),
        (10, 0.25, 2),
        (10, 0.01, 1),
        (3, 0.9, 2),
        (2, 0.5, 1),
        (2, 0.99, 1),
        (2, 0.0, 0),
        (50, 0.0, 0),
        (1, 0.5, 0),
        (0, 0.5, 0),
    ],
)
def test_split_size(n_chunks: int, fraction: float, size: int) -> None:
    assert len(split_by_chunk(CHUNKS[:n_chunks], fraction, seed=0)) == size


@pytest.mark.parametrize("seed", range(20))
def test_split_never_holds_out_every_chunk(seed: int) -> None:
    assert len(split_by_chunk(CHUNKS[:3], 0.99, seed=seed)) == 2


def test_split_with_repeated_single_chunk_is_empty() -> None:
    assert split_by_chunk(["c1", "c1", "c1"], 0.5, seed=0) == set()


@pytest.mark.parametrize(
    ("system_prompt", "record"),
    [
        (
            None,
            {
                "messages": [
                    {"role": "user", "content": "How do I install Acme?"},
                    {"role": "assistant", "content": "Run `pip install acme`."},
                ]
            },
        ),
        (
            "You answer questions about Acme.",
            {
                "messages": [
                    {"role": "system", "content": "You answer questions about Acme."},
                    {"role": "user", "content": "How do I install Acme?"},
                    {"role": "assistant", "content": "Run `pip install acme`."},
                ]
            },
        ),
        (
            "",
            {
                "messages": [
                    {"role": "user", "content": "How do I install Acme?"},
                    {"role": "assistant", "content": "Run `pip install acme`."},
                ]
            },
        ),
    ],
)
def test_chat_record(system_prompt: str | None, record: dict[str, Any]) -> None:
    assert to_record(EXAMPLE, "chat", system_prompt) == record


def test_prompt_completion_record_ignores_system_prompt() -> None:
    assert to_record(EXAMPLE, "prompt-completion", "You answer questions about Acme.") == {
        "prompt": "How do I install Acme?\n\n###\n\n",
        "completion": " Run `pip install acme`. END",
    }


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    records = [to_record(EXAMPLE, "chat", "Système: ünïcode"), to_record(EXAMPLE, "prompt-completion", None)]
    path = tmp_path / "out" / "train.jsonl"

    write_jsonl(path, records)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]


def test_write_jsonl_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("old content that is longer than the new content\n" * 10, encoding="utf-8")

    write_jsonl(path, [HI])

    assert (
        path.read_text(encoding="utf-8") == json.dumps(HI, separators=(",", ":"), ensure_ascii=False) + "\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_write_jsonl_of_nothing_is_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "valid.jsonl"

    write_jsonl(path, [])

    assert path.read_text(encoding="utf-8") == ""


def test_example_tokens_chat_by_hand() -> None:
    # "Hi" and "Hello" are one cl100k token each; each message costs 3 + 1 (role) + content; the reply
    # is primed with 3 more: 3 + (3 + 1 + 1) + (3 + 1 + 1) = 13.
    assert example_tokens(HI) == 13


def test_example_tokens_prompt_completion_by_hand() -> None:
    # "Hi\n\n###\n\n" is "Hi", "\n\n", "###\n\n" (3 tokens); " Hello END" is " Hello", " END" (2 tokens).
    assert example_tokens({"prompt": "Hi\n\n###\n\n", "completion": " Hello END"}) == 5


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "invalid JSON (Expecting property name enclosed in double quotes)"),
        ("", "invalid JSON (Expecting value)"),
        ("[1, 2]", "not a JSON object"),
        ('{"prompt": "a"}', "neither 'messages' nor 'prompt'/'completion'"),
        ('{"messages": []}', "'messages' is not a non-empty list"),
        ('{"messages": "Hi"}', "'messages' is not a non-empty list"),
        ('{"messages": [{"content": "Hi"}]}', "a message without a role"),
        ('{"messages": [{"role": "tool", "content": "Hi"}]}', "unrecognised role 'tool'"),
        ('{"messages": ["Hi"]}', "a message without a role"),
        ('{"messages": [{"role": null, "content": "Hi"}]}', "unrecognised role None"),
        ('{"messages": [{"role": ["user"], "content": "Hi"}]}', "unrecognised role ['user']"),
        (
            '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
            "empty user message",
        ),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]}',
            "empty assistant message",
        ),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant message"),
    ],
)
def test_validate_reports_path_line_and_problem(tmp_path: Path, line: str, problem: str) -> None:
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(HI), line])

    report = validate_jsonl(path, token_limit=100)

    assert report.errors == [f"{path}:2: {problem}"]
    assert report.examples == 1


def test_validate_clean_file(tmp_path: Path) -> None:
    records = [to_record(EXAMPLE, "chat", None), HI]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)

    report = validate_jsonl(path, token_limit=1000)

    n = example_tokens(records[0])
    assert report == ValidationReport(
        path=path, examples=2, errors=[], duplicates=0, over_limit=0, tokens=n + 13, max_example_tokens=n
    )


def test_validate_counts_duplicates(tmp_path: Path) -> None:
    other = to_record(EXAMPLE, "chat", None)
    reordered_keys = json.dumps({"messages": [{"content": "Hi", "role": "user"}, HI["messages"][1]]})
    path = write_lines(
        tmp_path / "train.jsonl", [json.dumps(HI), json.dumps(other), json.dumps(HI), reordered_keys]
    )

    report = validate_jsonl(path, token_limit=1000)

    assert (report.examples, report.duplicates) == (4, 2)


def test_validate_caps_tokens_at_the_limit(tmp_path: Path) -> None:
    long = to_record(Example("c2", "Why? " * 40, "Because. " * 40), "chat", None)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(HI), json.dumps(long), json.dumps(long)])
    n_long = example_tokens(long)

    report = validate_jsonl(path, token_limit=20)

    assert n_long > 20
    assert (report.examples, report.over_limit, report.tokens, report.max_example_tokens) == (
        3,
        2,
        13 + 20 + 20,
        n_long,
    )


def test_validate_example_exactly_at_limit_is_not_over(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(HI)])

    report = validate_jsonl(path, token_limit=13)

    assert (report.over_limit, report.tokens) == (0, 13)
