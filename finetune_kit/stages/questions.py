"""Turn a model's rambling list into distinct, well-formed questions, with a reason for every reject."""

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

_ITEM = re.compile(
    r"^\s*(?:(?:Q(?:uestion)?\s*)?\d{1,2}\s*[.):\]-]|[-*•+]|Q(?:uestion)?\s*\d*\s*:)\s*(.*)$", re.I
)
_DECORATION = re.compile(r"^[\s\"'“”*_`>]+|[\s\"'“”*_`]+$")
_PROMPT_ECHO = (
    "documentation:",
    "questions:",
    "answer:",
    "one per line",
    "numbered list",
    "documentation above",
    "code above",
)
MIN_WORDS = 3
MAX_WORDS = 60


@dataclass(frozen=True)
class Candidate:
    """One parsed line and, if it was rejected, why."""

    text: str
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        """True if the candidate became a question."""
        return self.reason is None


def split_list_items(output: str) -> list[str]:
    """The items of a numbered or bulleted list; a first item without its number (the prompt gave it) counts."""
    items: list[str] = []
    current: list[str] | None = None
    for line in output.splitlines():
        if not line.strip():
            current = None
            continue
        match = _ITEM.match(line)
        if match:
            current = [match.group(1)]
            items.append("")
        elif current is None and not items:
            current = [line]  # the prompt ended with "1." so the model's first item has no number
            items.append("")
        elif current is not None and not _clean(current[-1]).endswith("?"):
            current.append(line.strip())  # a wrapped continuation line
        else:
            current = None  # prose between or after the list, even without a blank line before it
            continue
        items[-1] = " ".join(part.strip() for part in current)
    return [item for item in (_clean(raw) for raw in items) if item]


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = _DECORATION.sub("", text)
    return text.strip()


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower()).strip()


def _similar(a: str, b: str, threshold: float) -> bool:
    return SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold


def judge(text: str, kept: list[str], threshold: float) -> str | None:
    """Why `text` is not a usable question given those already `kept`, or None if it is."""
    words = text.split()
    if not text.endswith("?"):
        return "not a question (no question mark)"
    if text.count("?") > 1:
        return "several questions in one"
    if len(words) < MIN_WORDS:
        return f"too short (under {MIN_WORDS} words)"
    if len(words) > MAX_WORDS:
        return f"too long (over {MAX_WORDS} words)"
    if any(marker in text.lower() for marker in _PROMPT_ECHO):
        return "echoes the prompt"
    norm = _normalise(text)
    for other in kept:
        if _normalise(other) == norm:
            return "duplicate"
        if _similar(_normalise(other), norm, threshold):
            return "near duplicate"
    return None


def select_questions(
    output: str, wanted: int, already: list[str], threshold: float, truncated: bool = False
) -> list[Candidate]:
    """Judge each list item of `output` in order; stop once `wanted` questions (with `already`) are accepted."""
    items = split_list_items(output)
    if truncated and items and not items[-1].endswith("?"):
        items[-1:] = []  # cut off mid-sentence by max_tokens
    kept = list(already)
    judged: list[Candidate] = []
    for item in items:
        if len(kept) >= wanted:
            break
        reason = judge(item, kept, threshold)
        judged.append(Candidate(item, reason))
        if reason is None:
            kept.append(item)
    return judged
