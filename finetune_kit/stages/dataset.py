"""Fine-tuning files: split by chunk, write JSONL atomically, and validate like OpenAI's data-prep tool."""

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonlines

from finetune_kit.disk_space import written_whole
from finetune_kit.tokens import count_tokens

PROMPT_SEPARATOR = "\n\n###\n\n"
COMPLETION_STOP = " END"
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Example:
    """One accepted question/answer pair and the chunk it came from."""

    chunk_id: str
    question: str
    answer: str
    paraphrase: bool = False  # another phrasing of a training question: never held out for validation
    negative: bool = False  # a question the docs do not answer, with the bot's refusal (stages/negatives.py)


@dataclass
class ValidationReport:
    """What OpenAI's data-prep checks found in one file."""

    path: Path
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    over_limit: int = 0
    tokens: int = 0  # billed tokens in one epoch (each example capped at the limit)
    max_example_tokens: int = 0


def split_by_chunk(chunk_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The chunk ids held out for validation: a seeded, order-independent pick, so no chunk straddles the split."""
    unique = sorted(set(chunk_ids))
    if fraction <= 0 or len(unique) < 2:
        return set()
    ranked = sorted(unique, key=lambda cid: hashlib.sha256(f"{seed}\0{cid}".encode()).hexdigest())
    n_validation = min(len(unique) - 1, max(1, round(len(unique) * fraction)))
    return set(ranked[:n_validation])


def held_out_chunks(examples: list[Example], fraction: float, seed: int) -> set[str]:
    """The chunk ids held out for validation: answered examples and "I don't know" ones each split alike.

    Split apart, so that adding negatives never moves an answered chunk from one side to the other.
    """
    answered = [e.chunk_id for e in examples if not e.negative]
    negatives = [e.chunk_id for e in examples if e.negative]
    return split_by_chunk(answered, fraction, seed) | split_by_chunk(negatives, fraction, seed)


def to_record(
    example: Example, fmt: Literal["chat", "prompt-completion"], system_prompt: str | None
) -> dict[str, Any]:
    """One JSONL line in the chosen format."""
    if fmt == "prompt-completion":
        return {
            "prompt": example.question + PROMPT_SEPARATOR,
            "completion": " " + example.answer + COMPLETION_STOP,
        }
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [
        {"role": "user", "content": example.question},
        {"role": "assistant", "content": example.answer},
    ]
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records to `path` via a temporary file and an atomic rename; a full disk leaves the old file as it was."""
    with (
        written_whole(path, needed=lambda: jsonl_bytes(records)) as tmp,
        jsonlines.open(tmp, mode="w", compact=True, sort_keys=False) as writer,
    ):
        writer.write_all(records)


def jsonl_bytes(records: list[dict[str, Any]]) -> int:
    """The size of `records` written as compact JSON lines, as write_jsonl writes them."""
    return sum(len(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()) + 1 for r in records)


def example_tokens(record: dict[str, Any]) -> int:
    """Tokens in one example, counted as OpenAI's cookbook does (3 per message + content + 3 for the reply)."""
    if "messages" in record:
        return 3 + sum(3 + count_tokens(str(m.get("content", ""))) + 1 for m in record["messages"])
    return count_tokens(str(record.get("prompt", ""))) + count_tokens(str(record.get("completion", "")))


def _format_error(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" not in record:
        has_pc = isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
        return None if has_pc else "neither 'messages' nor 'prompt'/'completion'"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            return "a message without a role"
        if not isinstance(message["role"], str) or message["role"] not in ROLES:  # a list role is unhashable
            return f"unrecognised role {message['role']!r}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"empty {message['role']} message"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message"
    return None


def validate_jsonl(path: Path, token_limit: int) -> ValidationReport:
    """Check every line of a fine-tuning file: well-formed, roles present, within the token limit, duplicates."""
    report = ValidationReport(path=path)
    seen: Counter[str] = Counter()
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.errors.append(f"{path}:{line_no}: invalid JSON ({exc.msg})")
                continue
            if problem := _format_error(record):
                report.errors.append(f"{path}:{line_no}: {problem}")
                continue
            report.examples += 1
            n = example_tokens(record)
            report.max_example_tokens = max(report.max_example_tokens, n)
            report.over_limit += n > token_limit
            report.tokens += min(n, token_limit)
            seen[json.dumps(record, sort_keys=True)] += 1
    report.duplicates = sum(count - 1 for count in seen.values())
    return report
