"""Prompt templates: plain text with {placeholders}, versioned by a hash of their content."""

import hashlib
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_kit.errors import ConfigError

if TYPE_CHECKING:
    from finetune_kit.config import Settings

REQUIRED_PLACEHOLDERS = {
    "questions": {"product", "n", "chunk"},
    "code_questions": {"product", "n", "chunk"},  # the questions template for chunks of source code
    "answers": {"product", "chunk", "question"},
    "code_answers": {"product", "chunk", "question"},  # the answers template for chunks of source code
    "grounded_answer": {"product", "sources"},  # the system prompt of answers from numbered retrieved chunks
    "condense": {"product", "history", "message"},  # a follow-up as one standalone question (retrieval)
    "unanswerable": {"product", "n", "headings"},  # questions the docs cannot answer (IDK calibration)
    "eval_judge": {"product", "question", "reference", "answer"},  # `ftkit eval`'s grading rubric
    "eval_faithfulness": {"product", "sources", "answer"},  # eval: which claims the retrieved chunks support
    "grounding_judge": {"product", "chunk", "question", "answer"},  # does the chunk support the answer?
    "grounding_reask": {"claim"},  # asks again, after the judge found a claim the chunk does not state
    "paraphrases": {"product", "question", "n"},  # other phrasings of a training question
    "negatives": {"product", "n", "headings"},  # "I don't know" training questions the docs do not answer
    "negatives_judge": {"product", "sources", "question"},  # do the retrieved passages answer it?
}
# A prompts_dir written before these templates existed lacks them; the bundled one is used then.
BUNDLED_WHEN_MISSING = {
    "code_questions",
    "code_answers",
    "grounded_answer",
    "condense",
    "unanswerable",
    "eval_judge",
    "eval_faithfulness",
    "grounding_judge",
    "grounding_reask",
    "paraphrases",
    "negatives",
    "negatives_judge",
}

logger = logging.getLogger(__name__)


def default_system_prompt(settings: "Settings") -> str:
    """The system message every chat example carries, and the bot answers with, unless one is configured."""
    return settings.system_prompt or f"You are a helpful technical support assistant for {settings.product}."


@dataclass(frozen=True)
class PromptTemplate:
    """A named template and the version (content hash) that goes into every cache key made with it."""

    name: str
    text: str
    path: Path

    @property
    def version(self) -> str:
        """`p1:` and the first 12 hex digits of the template's SHA-256."""
        return "p1:" + hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, **values: object) -> str:
        """The template with its placeholders filled (braces inside the values are left alone)."""
        return self.text.format_map(values).strip()


def default_prompts_dir() -> Path:
    """The bundled templates: inside the installed package, or the repository's prompts/ folder."""
    packaged = Path(__file__).parent / "prompts"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "prompts"


def load_prompt(name: str, prompts_dir: Path | None = None) -> PromptTemplate:
    """Read and check template `name` (a key of REQUIRED_PLACEHOLDERS) from `prompts_dir` or the bundled set."""
    path = (prompts_dir or default_prompts_dir()) / f"{name}.txt"
    if prompts_dir is not None and name in BUNDLED_WHEN_MISSING and not path.exists():
        logger.debug("%s has no %s.txt; using the bundled one", prompts_dir, name)
        path = default_prompts_dir() / f"{name}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read prompt template ({exc.strerror}) — check prompts_dir"
        ) from exc
    try:
        # `is not None`, not truthiness: a bare {} is a positional field that render() cannot fill.
        found = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} — write literal braces as {{{{ and }}}}") from exc
    required = REQUIRED_PLACEHOLDERS[name]
    if missing := sorted(required - found):
        raise ConfigError(
            f"{path}: missing placeholder {{{missing[0]}}} — the template must use {sorted(required)}"
        )
    if unknown := sorted(found - required):
        raise ConfigError(f"{path}: unknown placeholder {{{unknown[0]}}} — use only {sorted(required)}")
    return PromptTemplate(name=name, text=text, path=path)


@dataclass(frozen=True)
class FormatTemplates:
    """A stage's template for documentation and its template for source code."""

    docs: PromptTemplate
    code: PromptTemplate

    def for_format(self, fmt: str) -> PromptTemplate:
        """The template for a chunk of a document of this format."""
        return self.code if fmt == "code" else self.docs


def load_format_templates(name: str, prompts_dir: Path | None = None) -> FormatTemplates:
    """Template `name` (questions, answers) and its `code_` variant, from `prompts_dir` or the bundled set."""
    return FormatTemplates(docs=load_prompt(name, prompts_dir), code=load_prompt(f"code_{name}", prompts_dir))
