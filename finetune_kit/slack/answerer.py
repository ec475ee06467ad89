"""The model behind the bot: a small protocol, and its OpenAI-compatible implementation (streaming, deadline)."""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import openai

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError, FtkitError
from finetune_kit.llm.client import Endpoint
from finetune_kit.tokens import count_tokens, truncate_tokens

log = logging.getLogger(__name__)

API_CONTEXT_TOKENS = 16_384  # a window every current chat model has; also bounds what one answer costs
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one chat message
CONTEXT_SAFETY = 0.9  # our tokenizer is an estimate of the model's own
RETRY_PAUSE_S = 0.5
TRANSIENT_ERRORS = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)

OnText = Callable[[str], None]


@dataclass(frozen=True)
class Turn:
    """One message of a thread, as the model sees it."""

    role: Literal["user", "assistant"]
    text: str


class AnswerFailed(FtkitError):
    """The model gave no answer; `reason` is one short line, safe to store."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


class Answerer(Protocol):
    """Turns a conversation (oldest first, the question last) into an answer."""

    model: str

    def answer(self, turns: Sequence[Turn], on_text: OnText | None = None) -> str:
        """The answer; `on_text` is called with the text so far while it streams. Raises AnswerFailed."""
        ...


def bot_model(settings: Settings) -> str:
    """The model the bot answers with: --model, else the newest fine-tuned model, else the base model."""
    return settings.slack_model or registered_model(settings) or settings.fine_tune_base_model


def registered_model(settings: Settings) -> str | None:
    """The newest succeeded fine-tuned model of the workspace that can answer, or None.

    Local jobs that finished while nobody watched are registered first; a local model whose adapter llama.cpp
    cannot serve (trained over a Hugging Face folder, not a GGUF) is passed over.
    """
    if not settings.db_path.exists():
        return None
    from finetune_kit.store import Store
    from finetune_kit.training.sync import servable_models, sync_registry

    with Store(settings.db_path) as store:
        for line in sync_registry(settings, store):
            log.info("%s", line)
        models = servable_models(store)
    return models[0].name if models else None


def context_tokens(settings: Settings, embedded: bool | None = None) -> int:
    """The answering model's context window: configured, the embedded server's, or a safe API default."""
    if settings.slack_context_tokens is not None:
        return settings.slack_context_tokens
    if embedded is None:
        embedded = settings.resolved_provider == "local"
    return settings.local_context_tokens if embedded else API_CONTEXT_TOKENS


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
    """Answers through any OpenAI-compatible endpoint, at most `max_concurrency` calls at once."""

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
        self._api_key = endpoint.api_key
        self._sdk = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0)

    @classmethod
    def from_settings(cls, endpoint: Endpoint, settings: Settings) -> "OpenAIAnswerer":
        """An answerer configured by the slack_* settings."""
        from finetune_kit.stages.build_dataset import default_system_prompt

        return cls(
            endpoint,
            system_prompt=settings.slack_system_prompt or default_system_prompt(settings),
            temperature=settings.slack_temperature,
            max_tokens=settings.slack_max_answer_tokens,
            context_tokens=context_tokens(settings, embedded=endpoint.identity.startswith("local:")),
            timeout_s=settings.slack_timeout_s,
            max_concurrency=settings.slack_concurrency,
            stream=settings.slack_stream,
        )

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._sdk.close()

    def answer(self, turns: Sequence[Turn], on_text: OnText | None = None) -> str:
        """The model's answer to the last turn, given the earlier ones; the timeout starts once a slot is free."""
        payload = {
            "model": self.model,
            "messages": fit_to_context(self.system_prompt, turns, self.prompt_budget),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        with self._slots:
            text = self._complete(payload, time.monotonic() + self.timeout_s, on_text)
        if not text.strip():
            raise AnswerFailed("the model returned an empty answer")
        return text.strip()

    def _complete(self, payload: dict[str, Any], deadline: float, on_text: OnText | None) -> str:
        """One completion, retried once after a rate limit, server error or dropped connection."""
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                if self.stream:
                    return self._streamed(payload, deadline, remaining, on_text)
                response = self._sdk.chat.completions.create(**payload, timeout=remaining)
                return (response.choices[0].message.content or "") if response.choices else ""
            except openai.APITimeoutError:
                break
            except TRANSIENT_ERRORS as exc:
                if attempt == 2:
                    raise AnswerFailed(self._describe(exc)) from exc
                time.sleep(min(RETRY_PAUSE_S, max(deadline - time.monotonic(), 0)))
            except openai.APIError as exc:
                raise AnswerFailed(self._describe(exc)) from exc
        raise AnswerFailed(f"no answer within {self.timeout_s:g} s", timed_out=True)

    def _describe(self, exc: openai.APIError) -> str:
        """One short line about a failed call: the status and the server's words, never a traceback or the key."""
        status = getattr(exc, "status_code", None)
        body = exc.body.get("message") if isinstance(exc.body, dict) else None
        message = " ".join(str(body or exc.message).split())[:160]
        if len(self._api_key) > 4:
            message = message.replace(self._api_key, "***")
        return f"HTTP {status}: {message}" if status else message

    def _streamed(
        self, payload: dict[str, Any], deadline: float, remaining: float, on_text: OnText | None
    ) -> str:
        text = ""
        stream = self._sdk.chat.completions.create(**payload, stream=True, timeout=remaining)
        with contextlib.closing(stream):
            for chunk in stream:
                if time.monotonic() > deadline:
                    raise AnswerFailed(f"no answer within {self.timeout_s:g} s", timed_out=True)
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    text += delta
                    if on_text is not None:
                        on_text(text)
        return text


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
