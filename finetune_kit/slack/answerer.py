"""The model behind the bot: a small protocol, and its OpenAI-compatible implementation (streaming, deadline)."""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from finetune_kit.config import Settings
from finetune_kit.errors import AnswerFailed, ConfigError, LLMError
from finetune_kit.llm.api import ChatAPI, Endpoint, RetryPolicy, Wording
from finetune_kit.llm.rate_limit import RateLimiter
from finetune_kit.tokens import count_tokens, truncate_tokens

log = logging.getLogger(__name__)

API_CONTEXT_TOKENS = 16_384  # a window every current chat model has; also bounds what one answer costs
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one chat message
CONTEXT_SAFETY = 0.9  # our tokenizer is an estimate of the model's own
ANSWER_RETRIES = 1  # a person is waiting: one more try, within the answer's deadline
# What the bot stores and logs about a failed call: the status and the server's words, never the key.
ANSWER_WORDING = Wording(
    refused_key="HTTP {status}: {reason}",
    unreachable="{reason}",
    forbidden="HTTP {status}: {reason}",
    not_found="HTTP {status}: {reason}",
    rejected="HTTP {status}: {reason}",
    failed="HTTP {status}: {reason}",
)

OnText = Callable[[str], None]


@dataclass(frozen=True)
class Turn:
    """One message of a thread, as the model sees it."""

    role: Literal["user", "assistant"]
    text: str


class Answerer(Protocol):
    """Turns a conversation (oldest first, the question last) into an answer."""

    model: str
    prompt_budget: int  # tokens the system prompt and the conversation may take

    def answer(self, turns: Sequence[Turn], on_text: OnText | None = None, system: str | None = None) -> str:
        """The answer (`system` replaces the configured system prompt); `on_text` gets the text so far while it
        streams. Raises AnswerFailed."""
        ...


class CitedSource(Protocol):
    """A source an answer cites, as the bot links it (retrieval.answer.Source)."""

    @property
    def n(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def heading(self) -> str: ...
    @property
    def chunk_id(self) -> str: ...


class RetrievedChunk(Protocol):
    """A chunk retrieved for an answer, as the bot records it (retrieval.types.Hit)."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def score(self) -> float: ...


class SourcedAnswer(Protocol):
    """An answer from the docs (retrieval.answer.GroundedAnswer), as the bot posts and records it."""

    @property
    def answer(self) -> str: ...
    @property
    def refused(self) -> bool: ...
    @property
    def query(self) -> str: ...
    @property
    def sources(self) -> Sequence[CitedSource]: ...
    @property
    def retrieved(self) -> Sequence[RetrievedChunk]: ...


class DocsAnswerer(Protocol):
    """Answers a question from the retrieved docs, with the conversation before it (retrieval.answer)."""

    def answer_from_docs(
        self, question: str, history: Sequence[Turn], on_text: OnText | None = None
    ) -> SourcedAnswer:
        """The checked answer; raises AnswerFailed when the model fails, VagueQueryError for a vague question."""
        ...


def bot_model(settings: Settings) -> str:
    """The model the bot answers with: --model, else the newest fine-tuned model, else the base model."""
    return settings.slack.model or registered_model(settings) or settings.fine_tune_base_model


def registered_model(settings: Settings) -> str | None:
    """The newest succeeded fine-tuned model of the workspace that can answer, or None; it reads, changing nothing.

    Jobs that finished while nobody watched count once `training.sync.settle_jobs` registered them (`ftkit ask` and
    `ftkit slack` call it first); a local model whose adapter llama.cpp cannot serve (trained over a Hugging Face
    folder, not a GGUF) is passed over.
    """
    if not settings.db_path.exists():
        return None
    from finetune_kit.store import Store
    from finetune_kit.training.sync import servable_models

    with Store(settings.db_path) as store:
        models = servable_models(store)
    return models[0].name if models else None


def context_tokens(settings: Settings, embedded: bool | None = None) -> int:
    """The answering model's context window: configured, the embedded server's, or a safe API default."""
    if settings.slack.context_tokens is not None:
        return settings.slack.context_tokens
    if embedded is None:
        embedded = settings.resolved_provider == "local"
    return settings.local_context_tokens if embedded else API_CONTEXT_TOKENS


def prompt_budget(settings: Settings, embedded: bool | None = None) -> int:
    """The prompt tokens the bot's answerer allows: the context window, less a margin and the answer."""
    window = context_tokens(settings, embedded=embedded)
    return max(int(window * CONTEXT_SAFETY) - settings.slack.max_answer_tokens, 128)


def fit_to_context(system: str, turns: Sequence[Turn], budget_tokens: int) -> list[dict[str, str]]:
    """Chat messages: the system prompt, then the newest turns that fit in `budget_tokens` (the question always)."""
    used = count_tokens(system) + MESSAGE_OVERHEAD_TOKENS
    question = turns[-1]
    room = max(budget_tokens - used - MESSAGE_OVERHEAD_TOKENS, 16)
    kept = [Turn(question.role, truncate_tokens(question.text, room))]
    used += count_tokens(kept[0].text) + MESSAGE_OVERHEAD_TOKENS
    for turn in reversed(turns[:-1]):
        cost = count_tokens(turn.text) + MESSAGE_OVERHEAD_TOKENS
        if used + cost > budget_tokens:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    while len(kept) > 1 and kept[0].role == "assistant":  # a conversation opens with the user
        kept.pop(0)
    messages = [{"role": "system", "content": system}]
    for turn in kept:  # chat templates expect user and assistant to alternate
        if messages[-1]["role"] == turn.role:
            messages[-1]["content"] += "\n\n" + turn.text
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


class OpenAIAnswerer:
    """Answers through any OpenAI-compatible endpoint, at most `max_concurrency` calls at once.

    Calls run on the answerer's own event loop (one thread), through the same ChatAPI that generation uses;
    `answer` blocks its caller's thread, which also receives the streamed text.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        system_prompt: str,
        temperature: float,
        max_tokens: int,
        context_tokens: int,
        timeout_s: float,
        max_concurrency: int,
        stream: bool,
    ) -> None:
        self.model = endpoint.model
        self.system_prompt = system_prompt
        self.temperature, self.max_tokens, self.timeout_s, self.stream = (
            temperature,
            max_tokens,
            timeout_s,
            stream,
        )
        self.prompt_budget = int(context_tokens * CONTEXT_SAFETY) - max_tokens
        if self.prompt_budget < 128:
            raise ConfigError(
                f"slack_max_answer_tokens ({max_tokens}) leaves no room for the question in a {context_tokens}-token "
                "context — lower slack_max_answer_tokens or raise slack_context_tokens"
            )
        self._slots = threading.BoundedSemaphore(max_concurrency)
        limiter = RateLimiter(max_concurrency=max_concurrency)
        self._api = ChatAPI(endpoint, limiter, timeout_s=timeout_s, wording=ANSWER_WORDING)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="answerer", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, endpoint: Endpoint, settings: Settings) -> "OpenAIAnswerer":
        """An answerer configured by the slack_* settings."""
        from finetune_kit.prompts import default_system_prompt

        return cls(
            endpoint,
            system_prompt=settings.slack.system_prompt or default_system_prompt(settings),
            temperature=settings.slack.temperature,
            max_tokens=settings.slack.max_answer_tokens,
            context_tokens=context_tokens(settings, embedded=endpoint.identity.startswith("local:")),
            timeout_s=settings.slack.timeout_s,
            max_concurrency=settings.slack.concurrency,
            stream=settings.slack.stream,
        )

    def close(self) -> None:
        """Release the HTTP connection pool and stop the answerer's event loop."""
        asyncio.run_coroutine_threadsafe(self._api.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def answer(self, turns: Sequence[Turn], on_text: OnText | None = None, system: str | None = None) -> str:
        """The model's answer to the last turn, given the earlier ones; the timeout starts once a slot is free."""
        payload = {
            "model": self.model,
            "messages": fit_to_context(system or self.system_prompt, turns, self.prompt_budget),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        with self._slots:
            text = self._on_loop(payload, on_text)
        if not text.strip():
            raise AnswerFailed("the model returned an empty answer")
        return text.strip()

    def _on_loop(self, payload: dict[str, Any], on_text: OnText | None) -> str:
        """Run one completion on the event loop; its streamed text reaches `on_text` in this thread."""
        updates: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._complete(payload, updates.put), self._loop)
        future.add_done_callback(lambda _: updates.put(None))
        while (text := updates.get()) is not None:
            if on_text is not None:
                on_text(text)
        return future.result()

    async def _complete(self, payload: dict[str, Any], on_text: OnText) -> str:
        """One completion, retried under the shared policy until the answer's deadline."""
        deadline = time.monotonic() + self.timeout_s
        policy = RetryPolicy(ANSWER_RETRIES, deadline=deadline)
        completion = self._api.complete(payload, policy, stream=self.stream, on_text=on_text)
        try:
            body = await asyncio.wait_for(completion, self.timeout_s)
        except TimeoutError:
            raise AnswerFailed(f"no answer within {self.timeout_s:g} s", timed_out=True) from None
        except LLMError as exc:
            if time.monotonic() >= deadline:  # the SDK's own timeout fired as the deadline passed
                raise AnswerFailed(f"no answer within {self.timeout_s:g} s", timed_out=True) from exc
            raise AnswerFailed(str(exc)) from exc
        choices = body.get("choices") or [{}]
        return (choices[0].get("message") or {}).get("content") or ""


@contextlib.contextmanager
def open_answerer(settings: Settings) -> Iterator[OpenAIAnswerer]:
    """The bot's answerer on the configured endpoint (the embedded server lives exactly as long as this context)."""
    from finetune_kit.llm.endpoint import open_model_endpoint

    with open_model_endpoint(settings, bot_model(settings)) as endpoint:
        answerer = OpenAIAnswerer.from_settings(endpoint, settings)
        log.info("answering with model %s at %s", endpoint.model, endpoint.base_url)
        try:
            yield answerer
        finally:
            answerer.close()
