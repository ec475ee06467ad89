"""The questions an eval asks: the workspace's held-out ones, or a team's own set from a JSONL file."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError
from finetune_kit.llm.endpoint import endpoint_identity
from finetune_kit.slack.answerer import Turn
from finetune_kit.stages.build_dataset import accepted_examples
from finetune_kit.stages.dataset import split_by_chunk
from finetune_kit.store import Store

MAX_FILE_BYTES = 20 * 1024 * 1024  # a questions file past this is refused, not read
MAX_QUESTIONS = 10_000
MAX_QUESTION_CHARS = 8_000  # a longer question is cut: the answerer fits it to the context anyway
FIELDS = {"question", "reference", "gold_paths", "answerable", "history", "id"}


@dataclass(frozen=True)
class EvalQuestion:
    """One question to put to every arm, with what a good answer looks like and where it is in the docs."""

    id: str
    question: str
    reference: str | None = None  # an accepted answer; None: only judge-free and retrieval metrics
    gold_paths: tuple[str, ...] = ()  # document paths or URLs where the answer is
    answerable: bool = True
    history: tuple[Turn, ...] = ()  # earlier turns of the conversation, oldest first
    origin: str = "held-out"  # "held-out", or the questions file's name


def held_out_questions(store: Store, settings: Settings) -> list[EvalQuestion]:
    """Accepted questions of the validation split's chunks (never trained on), with their answers and documents.

    The split is the one build-dataset writes: `split_by_chunk` over the same accepted examples, seed and fraction.
    """
    examples = accepted_examples(store, settings, *endpoint_identity(settings))
    held_out = split_by_chunk(
        [e.chunk_id for e in examples], settings.validation_fraction, settings.split_seed
    )
    paths = _document_paths(store, held_out)
    return [
        EvalQuestion(
            id="h:" + hashlib.sha256(f"{e.chunk_id}\0{e.question}".encode()).hexdigest()[:12],
            question=e.question,
            reference=e.answer,
            gold_paths=paths[e.chunk_id],
        )
        for e in examples
        if e.chunk_id in held_out
    ]


def _document_paths(store: Store, chunk_ids: set[str]) -> dict[str, tuple[str, ...]]:
    """Each chunk's document path and its URL (either one identifies the gold document)."""
    found: dict[str, tuple[str, ...]] = {}
    for chunk_id in chunk_ids:
        row = store.db.execute(
            "SELECT d.path, d.source_url FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id = ?",
            (chunk_id,),
        ).fetchone()
        found[chunk_id] = (row["path"], row["source_url"]) if row else ()
    return found


def load_questions_file(path: Path) -> list[EvalQuestion]:
    """Every question of a JSONL file; the first bad line is one error naming it, and nothing is returned."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size} bytes, over the {MAX_FILE_BYTES} a questions file may have")
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the questions file ({exc.strerror}) — check --questions"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}) — save it as UTF-8 JSONL") from exc
    questions: list[EvalQuestion] = []
    seen: set[str] = set()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse_line(line, f"{path.stem}:{line_no}", path.name)
        where = f"{path}:{line_no}"
        if isinstance(question, str):
            raise ConfigError(f"{where}: {question} — {_FORMAT_HINT}")
        if question.id in seen:
            raise ConfigError(f"{where}: id {question.id!r} is used twice — give each question its own id")
        seen.add(question.id)
        questions.append(question)
    if not questions:
        raise ConfigError(f"{path}: no questions — {_FORMAT_HINT}")
    if len(questions) > MAX_QUESTIONS:
        raise ConfigError(f"{path}: {len(questions)} questions, over the {MAX_QUESTIONS} one eval asks")
    return questions


_FORMAT_HINT = (
    'one JSON object per line: {"question": "…", "reference": "…", "gold_paths": ["guide.md"],'
    ' "answerable": true, "history": [{"role": "user", "text": "…"}], "id": "q1"}'
)


def _parse_line(line: str, default_id: str, origin: str) -> EvalQuestion | str:
    """The question on one line, or why the line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if unknown := sorted(set(record) - FIELDS):
        return f"unknown field {unknown[0]!r}"
    problem = _field_problem(record)
    if problem is not None:
        return problem
    return EvalQuestion(
        id=str(record.get("id", default_id)),
        question=record["question"].strip()[:MAX_QUESTION_CHARS],
        reference=(record.get("reference") or "").strip() or None,
        gold_paths=tuple(record.get("gold_paths") or ()),
        answerable=record.get("answerable", True),
        history=tuple(Turn(turn["role"], turn["text"]) for turn in record.get("history") or ()),
        origin=origin,
    )


def _field_problem(record: dict[str, Any]) -> str | None:
    """Why a record's fields do not make a question, or None."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return "'question' must be a non-empty string"
    if not isinstance(record.get("reference", ""), str | None):
        return "'reference' must be a string"
    gold = record.get("gold_paths", [])
    if not isinstance(gold, list) or not all(isinstance(p, str) and p for p in gold):
        return "'gold_paths' must be a list of paths or URLs"
    if not isinstance(record.get("answerable", True), bool):
        return "'answerable' must be true or false"
    if not isinstance(record.get("id", ""), str | int):
        return "'id' must be a string"
    history = record.get("history", [])
    if not isinstance(history, list) or not all(_is_turn(turn) for turn in history):
        return '\'history\' must be a list of {"role": "user"|"assistant", "text": "…"}'
    return None


def _is_turn(turn: object) -> bool:
    return (
        isinstance(turn, dict)
        and turn.get("role") in ("user", "assistant")
        and isinstance(turn.get("text"), str)
        and bool(turn["text"].strip())
    )


def gold_matches(gold_paths: tuple[str, ...], path: str, url: str) -> bool:
    """True if a retrieved document (its stored path or URL) is one of the gold ones."""
    wanted = {_normal(g) for g in gold_paths}
    return _normal(path) in wanted or _normal(url) in wanted


def _normal(path: str) -> str:
    return path.strip().removeprefix("./").strip("/")
