"""`ftkit ask`: one question, answered from the docs with checked sources (or by the model alone), as the bot does."""

import json
import logging
from dataclasses import asdict, dataclass

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.errors import ConfigError, RetrievalIndexError
from finetune_kit.retrieval.answer import GroundedAnswer, answer_with_sources
from finetune_kit.slack.answerer import OnText, OpenAIAnswerer, Turn, registered_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What a model said, and which model said it."""

    model: str
    text: str


def ask(settings: Settings, question: str, model: str | None = None, on_text: OnText | None = None) -> Answer:
    """Ask `model` (default: the newest registered fine-tuned model) one question, without retrieval."""
    from finetune_kit.llm.endpoint import open_model_endpoint

    name = answering_model(settings, question, model)
    with open_model_endpoint(settings, name) as endpoint:
        answerer = OpenAIAnswerer.from_settings(endpoint, settings)
        try:
            text = answerer.answer([Turn("user", question)], on_text)
        finally:
            answerer.close()
    return Answer(name, text)


def ask_question(
    settings: Settings, question: str, model: str | None = None, rag: bool | None = None
) -> GroundedAnswer | Answer:
    """From the docs when `rag` (None: the retrieval.rag setting), else from the model alone.

    Without an index, an explicit `rag` is the index's error; the setting's default falls back to the model
    alone, with a warning when the workspace has chunks an index would serve.
    """
    name = answering_model(settings, question, model)
    if rag if rag is not None else settings.retrieval.rag:
        try:
            return answer_with_sources(settings, question, model=name)
        except RetrievalIndexError as exc:
            if rag:
                raise
            if _has_chunks(settings):
                log.warning("answering without retrieval: %s", exc)
    return ask(settings, question, name)


def answering_model(settings: Settings, question: str, model: str | None) -> str:
    """`model`, else the newest fine-tuned model; an empty question or no model at all is a ConfigError."""
    if not question.strip():
        raise ConfigError('the question is empty — ftkit ask "How do I …?"')
    name = model or registered_model(settings)
    if name is None:
        raise ConfigError(
            f"no fine-tuned model in {settings.workspace} yet — `ftkit train --watch` makes one,"
            f" or pass --model (e.g. --model {LOCAL_MODEL_ALIAS} for the untuned base)"
        )
    return name


def _has_chunks(settings: Settings) -> bool:
    """True when the workspace has active chunks (something to index)."""
    from finetune_kit.store import Store

    if not settings.db_path.exists():
        return False
    with Store(settings.db_path) as store:
        return store.scalar("SELECT 1 FROM chunks WHERE status = 'active' LIMIT 1") is not None


def answer_lines(answer: GroundedAnswer | Answer) -> list[str]:
    """The answer as `ftkit ask` prints it: the text, then the sources it cites (`[n] title — heading  url`)."""
    if isinstance(answer, Answer):
        return [answer.text]
    if answer.refused:
        return [answer.answer]
    if answer.cited_nothing:
        return [answer.answer, "", "Sources: this answer cites no source — check it against the docs."]
    listed = [
        f"[{s.n}] {s.title}"
        + (f" — {s.heading}" if s.heading and s.heading != s.title else "")
        + f"  {s.url}"
        for s in answer.sources
    ]
    return [answer.answer, "", "Sources:", *listed]


def answer_json(answer: GroundedAnswer | Answer, question: str) -> str:
    """`ftkit ask --json`: answer, model, refused, query, sources, retrieved (each hit without its full text)."""
    if isinstance(answer, Answer):
        body = {"answer": answer.text, "model": answer.model, "refused": False, "query": question}
        return json.dumps(
            {**body, "rag": False, "cited_nothing": True, "sources": [], "retrieved": []}, indent=2
        )
    retrieved = [{k: v for k, v in asdict(hit).items() if k != "text"} for hit in answer.retrieved]
    body = {
        "answer": answer.answer,
        "model": answer.model,
        "refused": answer.refused,
        "query": answer.query,
        "rag": True,
        "cited_nothing": answer.cited_nothing,
        "sources": [asdict(source) for source in answer.sources],
        "retrieved": retrieved,
    }
    return json.dumps(body, indent=2, ensure_ascii=False)
