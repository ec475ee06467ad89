"""Follow-ups: a thread's history and its new message condensed into one standalone question for retrieval.

The query that retrieval searches is the condensation followed by the raw message, so a poor condensation (a
tiny model rambles) can add words but never lose the ones the user typed. The first message of a thread is
searched as it is, with no model call; every condensation is one cached call (a re-run costs nothing).
"""

import asyncio
import re
from collections.abc import Sequence
from typing import Protocol

from finetune_kit.config import Settings
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.prompts import PromptTemplate, load_prompt
from finetune_kit.retrieval.terms import content_words
from finetune_kit.store import Store

STAGE = "condense-question"
MAX_HISTORY_TURNS = 6  # the newest turns the model sees; older ones rarely hold what "it" refers to
MAX_TURN_CHARS = 600  # a long answer in the history is cut: its start names the topic
MAX_MESSAGE_CHARS = 2000
MAX_CONDENSED_CHARS = 300  # a longer condensation is cut at a word: a question is one sentence
MAX_TOKENS = 80
_LABEL = re.compile(r"^\s*(?:standalone\s+question|question|rewritten(?:\s+question)?|answer)\s*:\s*", re.I)
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,2}\s*[.):]|[-*•+])\s+")
_DECORATION = re.compile(r"^[\s\"'“”*_`>#-]+|[\s\"'“”*_`]+$")
_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_PROMPT_ECHO = ("conversation with a user", "follow-up message", "standalone question", "reply with")


class Message(Protocol):
    """One earlier message of a thread (slack.answerer.Turn is one): who said it and what."""

    @property
    def role(self) -> str:
        """'user' or 'assistant'."""
        ...

    @property
    def text(self) -> str:
        """What was said."""
        ...


def condense_template(settings: Settings) -> PromptTemplate:
    """The condensation prompt, from settings.prompts_dir or the bundled set."""
    return load_prompt("condense", settings.prompts_dir)


def condense_request(settings: Settings, history: Sequence[Message], message: str) -> ChatRequest:
    """The one request that condenses `history` and `message` (its hash is the cache key)."""
    template = condense_template(settings)
    prompt = template.render(
        product=settings.product, history=format_history(history), message=_cut(message, MAX_MESSAGE_CHARS)
    )
    return ChatRequest(
        stage=STAGE,
        messages=(("user", prompt),),
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        template_version=template.version,
    )


def format_history(history: Sequence[Message]) -> str:
    """The newest turns of a thread, one 'User: …' or 'Assistant: …' line each, long ones cut."""
    lines = []
    for turn in list(history)[-MAX_HISTORY_TURNS:]:
        speaker = "Assistant" if turn.role == "assistant" else "User"
        lines.append(f"{speaker}: {_cut(' '.join(turn.text.split()), MAX_TURN_CHARS)}")
    return "\n".join(lines)


def clean_condensation(output: str, history: Sequence[Message], message: str) -> str | None:
    """The question in a model's output, or None when it holds none (empty, an echo, off the thread's words)."""
    lines = [line for line in map(_bare, output.splitlines()) if line]
    if not lines:
        return None
    question = lines[0]
    if "?" in question:
        question = question[: question.index("?") + 1]  # a model that goes on after its question
    question = _cut(question, MAX_CONDENSED_CHARS)
    thread_words = content_words(" ".join([message, *(turn.text for turn in history)]))
    if len(question.split()) < 2 or any(echo in question.lower() for echo in _PROMPT_ECHO):
        return None
    if not content_words(question) & thread_words:  # a condensation about something nobody mentioned
        return None
    return question


def retrieval_query(condensed: str | None, message: str) -> str:
    """What retrieval searches: the condensation, then the raw message (alone when they say the same)."""
    if condensed is None or _normalised(condensed) == _normalised(message):
        return message
    return f"{condensed}\n{message}"


async def condense(
    client: LLMClient, settings: Settings, history: Sequence[Message], message: str
) -> str | None:
    """The model's standalone question for a follow-up (one cached call), or None for a first message or garbage."""
    if not history:
        return None
    result = await client.chat(condense_request(settings, history, message))
    return clean_condensation(result.content, history, message)


async def condensed_query(
    client: LLMClient, settings: Settings, history: Sequence[Message], message: str
) -> str:
    """`standalone_question` for a caller that holds an LLMClient on its own event loop."""
    return retrieval_query(await condense(client, settings, history, message), message)


def standalone_question(settings: Settings, history: Sequence[Message], message: str) -> str:
    """The retrieval query for `message` after `history`: no call for a first message, else one cached call."""
    if not history:
        return message
    return asyncio.run(_condensed_query_once(settings, history, message))


async def _condensed_query_once(settings: Settings, history: Sequence[Message], message: str) -> str:
    """Open the workspace's cache and the generation endpoint for one condensation."""
    from finetune_kit.llm.endpoint import one_call_client

    with Store(settings.db_path) as store:
        async with one_call_client(store, settings) as client:
            return await condensed_query(client, settings, history, message)


def _bare(line: str) -> str:
    """A line without its list marker, label ("Standalone question:") and quotes or emphasis."""
    line = _LIST_MARKER.sub("", _DECORATION.sub("", line))
    return _DECORATION.sub("", _LABEL.sub("", line))


def _cut(text: str, limit: int) -> str:
    """`text` cut at a word to at most `limit` characters."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"


def _normalised(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))
