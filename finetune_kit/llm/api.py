"""The one way to call an OpenAI-compatible API: SDK clients, one retry policy, SDK errors as ftkit errors.

OpenAI, Azure OpenAI's v1 API, vLLM, Ollama and the embedded llama.cpp server are all a base URL and a key.
Every caller (generation, batch, hosted training, the Slack bot, `ftkit ask`) builds its SDK client here, sends
through `request`/`request_sync` (or `ChatAPI` for chat completions), and gets its failures mapped here.
"""

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from finetune_kit.config import ModelPrice
from finetune_kit.errors import (
    AuthenticationError,
    EndpointUnreachableError,
    LLMError,
    PermissionDeniedError,
    RequestRejectedError,
    ResourceNotFoundError,
)
from finetune_kit.llm.rate_limit import RateLimiter, cool_down_s, pauses_everyone, retry_after_s

log = logging.getLogger(__name__)

T = TypeVar("T")
OnText = Callable[[str], None]

DEFAULT_TIMEOUT_S = 600.0  # the SDK's own default
KEEPALIVE_CONNECTIONS = 100  # the SDK's own default
RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and every 5xx: the statuses the SDK itself retries
BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_JITTER_S = (
    0.5,
    30.0,
    0.5,
)  # then doubling, for failures without a hint
PROMPT_RATIO_WEIGHT = (
    0.2  # of the newest response, in the EWMA of the server's prompt tokens per estimated one
)


@dataclass(frozen=True)
class Endpoint:
    """Where chat completions go; `identity` names the model server stably across restarts (for the cache)."""

    base_url: str
    api_key: str = field(repr=False)
    model: str
    identity: str
    price: ModelPrice = field(default_factory=ModelPrice)
    max_in_flight: int | None = (
        None  # what the server itself serves at once (a CPU: one); None: its limits say
    )


# --- SDK clients -----------------------------------------------------------------------------------------


def async_client(
    base_url: str, api_key: str, *, timeout_s: float | None = None, connections: int = KEEPALIVE_CONNECTIONS
) -> openai.AsyncOpenAI:
    """An async SDK client for an OpenAI-compatible base URL; retries are the policy's, never the SDK's.

    `connections` are kept open between requests: as many as may be in flight, or each request beyond them
    opens a connection (a TCP and TLS handshake) and closes it again.
    """
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=connections, keepalive_expiry=5.0)
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        timeout=timeout_s or DEFAULT_TIMEOUT_S,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits),
    )


def sync_client(base_url: str, api_key: str, *, timeout_s: float | None = None) -> openai.OpenAI:
    """A blocking SDK client for an OpenAI-compatible base URL; retries are the policy's, never the SDK's."""
    return openai.OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout_s or DEFAULT_TIMEOUT_S, max_retries=0
    )


# --- SDK errors as ftkit errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Wording:
    """How one kind of call words its failures, as templates over {url} {model} {doing} {status} {tries}
    {message} (the SDK's line) and {reason} (the server's own words); keys are blanked out of both."""

    refused_key: str
    unreachable: str
    forbidden: str
    not_found: str
    rejected: str
    failed: str


@dataclass(frozen=True)
class ApiCall:
    """One kind of call, as its errors name it: where it goes, what it does and how its failures read."""

    url: str
    api_key: str = field(repr=False)
    wording: Wording
    model: str = ""
    doing: str = ""


# (SDK error, wording field, ftkit error), first match wins; any other API error is a plain LLMError.
_MAPPING: tuple[tuple[type[openai.APIError], str, type[LLMError]], ...] = (
    (openai.AuthenticationError, "refused_key", AuthenticationError),
    (openai.APIConnectionError, "unreachable", EndpointUnreachableError),  # timeouts included
    (openai.PermissionDeniedError, "forbidden", PermissionDeniedError),
    (openai.NotFoundError, "not_found", ResourceNotFoundError),
    (openai.BadRequestError, "rejected", RequestRejectedError),
    (openai.UnprocessableEntityError, "rejected", RequestRejectedError),
)


def api_error(exc: openai.APIError, call: ApiCall, tries: int = 1) -> LLMError:
    """The ftkit error for an SDK failure: one line in the caller's words, naming the fix, never the key."""
    kind, error = next(((k, e) for sdk, k, e in _MAPPING if isinstance(exc, sdk)), ("failed", LLMError))
    template = getattr(call.wording, kind)
    return error(
        template.format(
            url=call.url,
            model=call.model,
            doing=call.doing,
            status=getattr(exc, "status_code", None) or "?",
            tries=" after 1 try" if tries == 1 else f" after {tries} tries",
            message=one_line(_masked(exc.message, call.api_key)),
            reason=one_line(_masked(_server_words(exc), call.api_key)),
        )
    )


def _server_words(exc: openai.APIError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or exc.message)


def _masked(text: str, secret: str) -> str:
    return text.replace(secret, "***") if len(secret) > 4 else text


def one_line(message: str, limit: int = 160) -> str:
    """`message` on one line, cut to `limit` characters."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --- The retry policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failure a later try can fix is sent again; the same rules for every caller."""

    max_retries: int
    deadline: float | None = None  # time.monotonic() after which no try starts
    limiter_cools_down: bool = False  # a 429 that says when to come back waits in the caller's RateLimiter


def retryable(exc: BaseException) -> bool:
    """True for failures a later try can fix: no connection, a timeout, HTTP 408, 409, 429 and 5xx."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code in RETRYABLE_STATUSES or exc.status_code >= 500
    )


def _headers(exc: BaseException | None) -> Mapping[str, str]:
    return exc.response.headers if isinstance(exc, openai.APIStatusError) else {}


class _WaitRetryAfter(wait_base):
    """Honour a server's Retry-After, else back off exponentially with jitter.

    One instance serves one request's tries. The exponent counts that request's failures without a hint (5xx,
    timeouts, a 429 that says nothing): a 429 that said when to come back was waited out as asked, and is no
    sign of a failing server, so after two of them a first 500 waits 0.5 s, not 2 s.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.unhinted = 0

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        headers = _headers(exc)
        rate_limited = isinstance(exc, openai.RateLimitError)
        shared = rate_limited and pauses_everyone(headers)
        if self.policy.limiter_cools_down and shared and cool_down_s(headers) is not None:
            return 0.0  # the limiter's shared cool-down is the wait
        if (hinted := retry_after_s(headers)) is not None:
            return hinted
        self.unhinted += 1
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.unhinted - 1)) + random.uniform(
            0, BACKOFF_JITTER_S
        )


class _StopAtDeadline(stop_base):
    """Stop when the next try would start after the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.monotonic() + retry_state.upcoming_sleep >= self.deadline


def _log_retry(retry_state: RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    log.info(
        "attempt %d failed (%s); retrying in %.2f s", retry_state.attempt_number, one_line(str(exc), 80), wait
    )


def _retry_options(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "retry": retry_if_exception(retryable),
        "wait": _WaitRetryAfter(policy),
        "stop": stop_after_attempt(policy.max_retries + 1) | _StopAtDeadline(policy.deadline),
        "before_sleep": _log_retry,
        "reraise": True,
    }


async def request(send: Callable[[], Awaitable[T]], call: ApiCall, policy: RetryPolicy) -> T:
    """`send()` under the retry policy; a failure retries cannot fix becomes the ftkit error naming the fix."""
    tries = 0

    async def attempt() -> T:
        nonlocal tries
        tries += 1
        return await send()

    try:
        return await AsyncRetrying(**_retry_options(policy))(attempt)
    except openai.APIError as exc:
        raise api_error(exc, call, tries) from exc


def request_sync(send: Callable[[], T], call: ApiCall, policy: RetryPolicy) -> T:
    """`request` for the blocking client."""
    tries = 0

    def attempt() -> T:
        nonlocal tries
        tries += 1
        return send()

    try:
        return Retrying(**_retry_options(policy))(attempt)
    except openai.APIError as exc:
        raise api_error(exc, call, tries) from exc


# --- Chat completions -----------------------------------------------------------------------------------


class ChatAPI:
    """Chat completions on one endpoint, streamed or not: paced by a RateLimiter, retried by the policy.

    After the endpoint refuses the key (401) no further request is sent: every later try fails at once.
    """

    def __init__(
        self, endpoint: Endpoint, limiter: RateLimiter, *, timeout_s: float, wording: Wording
    ) -> None:
        self.limiter = limiter
        self.call = ApiCall(endpoint.base_url, endpoint.api_key, wording, model=endpoint.model)
        self.refused: LLMError | None = None
        self.prompt_ratio = 1.0  # the server's prompt tokens per offline-estimated one (EWMA)
        self._sdk = async_client(
            endpoint.base_url, endpoint.api_key, timeout_s=timeout_s, connections=limiter.max_concurrency
        )

    async def close(self) -> None:
        """Release the HTTP connection pool."""
        await self._sdk.close()

    async def complete(
        self,
        payload: dict[str, Any],
        policy: RetryPolicy,
        *,
        prompt_tokens: Callable[[], int] | None = None,
        stream: bool = False,
        on_text: OnText | None = None,
    ) -> dict[str, Any]:
        """The chat.completion for `payload` as JSON; streamed, `on_text` gets the text so far at each delta.

        `prompt_tokens` estimates the prompt's tokens offline (None: not estimated), asked as each try goes out,
        for a tokens-per-minute budget: a try is charged the estimate, scaled to the server's own count as its
        responses teach, plus max_tokens, as OpenAI charges.
        """
        tries = 0

        def attempt() -> Awaitable[dict[str, Any]]:
            nonlocal tries
            tries += 1
            return self._attempt(payload, prompt_tokens, stream, on_text, retry=tries > 1)

        return await request(attempt, self.call, policy)

    def budget_tokens(self, payload: dict[str, Any], prompt_tokens: Callable[[], int] | None) -> int:
        """What a request costs a tokens-per-minute budget: the prompt as the server counts it, plus max_tokens."""
        if prompt_tokens is None:
            return 0
        return round(prompt_tokens() * self.prompt_ratio) + int(payload.get("max_tokens") or 0)

    async def _attempt(
        self,
        payload: dict[str, Any],
        prompt_tokens: Callable[[], int] | None,
        stream: bool,
        on_text: OnText | None,
        *,
        retry: bool = False,
    ) -> dict[str, Any]:
        """One HTTP request, paced by the rate limiter, which learns from the response's headers."""
        permit = await self.limiter.acquire(lambda: self.budget_tokens(payload, prompt_tokens), retry=retry)
        sent_at = None
        try:
            if self.refused is not None:  # seen while this request waited for its turn: do not send it
                raise AuthenticationError(str(self.refused))
            body = (payload | {"stream": True}) if stream else payload
            estimate = (
                prompt_tokens if self.limiter.needs_tokens else None
            )  # counting costs CPU: only if needed
            sent_at = self.limiter.sent(self.budget_tokens(payload, estimate))
            raw = await self._sdk.chat.completions.with_raw_response.create(**body)
            completion = await _read(raw.parse(), on_text)
        except openai.RateLimitError as exc:
            self._on_rate_limited(exc.response.headers, permit, sent_at)
            raise
        except openai.AuthenticationError as exc:
            self.refused = api_error(exc, self.call)
            self.limiter.heard()
            raise
        except openai.APIStatusError:
            self.limiter.heard()  # an error answered is an answer: the window's silent growth is over
            raise
        finally:
            self.limiter.release()
        self.limiter.observe(raw.headers, sent_at)
        self.limiter.on_success()
        self.limiter.completed(sent_at)
        self._learn_prompt_ratio(completion, prompt_tokens)
        return completion

    def _learn_prompt_ratio(
        self, completion: dict[str, Any], prompt_tokens: Callable[[], int] | None
    ) -> None:
        counted = int((completion.get("usage") or {}).get("prompt_tokens") or 0)
        counts = prompt_tokens is not None and counted > 0 and self.limiter.counts_tokens
        estimate = prompt_tokens() if prompt_tokens is not None and counts else 0
        if estimate > 0:  # the server's own count paces the token budget from now on
            self.prompt_ratio += PROMPT_RATIO_WEIGHT * (counted / estimate - self.prompt_ratio)

    def _on_rate_limited(self, headers: Mapping[str, str], permit: int, sent_at: float | None) -> None:
        self.limiter.observe(headers, sent_at)
        if not pauses_everyone(headers):  # budget left, or only a Retry-After: this request waits, alone
            self.limiter.rate_limited += 1
            log.info("rate limited (429) with budget left: retrying this request after its Retry-After")
            return
        self.limiter.on_rate_limited(cool_down_s(headers), permit)
        log.info(
            "rate limited (429): pausing all requests; now %d in flight at most", self.limiter.concurrency
        )


async def _read(
    parsed: ChatCompletion | openai.AsyncStream[ChatCompletionChunk], on_text: OnText | None
) -> dict[str, Any]:
    """The completion as JSON; a streamed one is read to its end (or until cancelled) and closed."""
    if isinstance(parsed, ChatCompletion):
        return parsed.model_dump(mode="json")
    async with parsed:
        return await _streamed(parsed, on_text)


async def _streamed(chunks: AsyncIterator[ChatCompletionChunk], on_text: OnText | None) -> dict[str, Any]:
    """Read a streamed completion into the shape of a non-streamed one."""
    text, finish_reason, usage = "", None, None
    async for chunk in chunks:
        usage = chunk.usage.model_dump(mode="json") if chunk.usage else usage
        if not chunk.choices:
            continue
        finish_reason = chunk.choices[0].finish_reason or finish_reason
        if delta := chunk.choices[0].delta.content:
            text += delta
            if on_text is not None:
                on_text(text)
    message = {"role": "assistant", "content": text}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}], "usage": usage}
