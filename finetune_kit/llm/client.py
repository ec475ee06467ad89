"""Async chat completions with bounded concurrency, retries, a request cache and a cost ledger."""

import asyncio
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from finetune_kit.config import ModelPrice
from finetune_kit.errors import AuthenticationError, EndpointUnreachableError, LLMError, RequestRejectedError
from finetune_kit.llm.budget import Budget, prompt_tokens
from finetune_kit.llm.rate_limit import RateLimiter, cool_down_s, retry_after_s
from finetune_kit.store import Store, utc_now

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (
    openai.RateLimitError,
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.InternalServerError,
)


@dataclass(frozen=True)
class Endpoint:
    """Where chat completions go; `identity` names the model server stably across restarts (for the cache)."""

    base_url: str
    api_key: str = field(repr=False)
    model: str
    identity: str
    price: ModelPrice = field(default_factory=ModelPrice)


@dataclass(frozen=True)
class ChatRequest:
    """Everything that determines one completion; its hash is the cache key."""

    stage: str
    messages: tuple[tuple[str, str], ...]
    temperature: float
    max_tokens: int
    template_version: str
    stop: tuple[str, ...] = ()
    attempt: int = 0  # a re-ask after unusable output is a different request

    def payload(self, model: str) -> dict[str, Any]:
        """The JSON body sent to /chat/completions."""
        return {
            "model": model,
            "messages": [{"role": role, "content": content} for role, content in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **({"stop": list(self.stop)} if self.stop else {}),
            "seed": self.attempt,  # reproducible sampling where the server supports it; a re-ask differs
        }


@dataclass(frozen=True)
class ChatResult:
    """One completion's text and accounting."""

    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached: bool


def request_hash(endpoint: Endpoint, request: ChatRequest) -> str:
    """A versioned hash of everything that determines a completion."""
    key = {"endpoint": endpoint.identity, "request": asdict(request) | {"model": endpoint.model}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return "r1:" + digest[:40]


class _WaitRetryAfter(wait_base):
    """Honour a server's Retry-After header, else back off exponentially with jitter.

    A 429 that says when to come back waits in the rate limiter's shared cool-down instead, not here.
    """

    def __init__(self) -> None:
        self.fallback = wait_exponential_jitter(multiplier=0.5, max=30, jitter=0.5)

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        response = getattr(exc, "response", None)
        headers = response.headers if response is not None else {}
        if isinstance(exc, openai.RateLimitError) and cool_down_s(headers) is not None:
            return 0.0
        retry_after = retry_after_s(headers)
        return retry_after if retry_after is not None else float(self.fallback(retry_state))


def _log_retry(retry_state: Any) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    log.info(
        "attempt %d failed (%s); retrying in %.2f s", retry_state.attempt_number, one_line(str(exc), 80), wait
    )


class LLMClient:
    """Cached, retried, concurrency-bounded chat completions against one endpoint."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: Store,
        *,
        max_concurrency: int,
        max_retries: int,
        timeout_s: float,
        run_id: int | None = None,
        budget: Budget | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.run_id = run_id
        self.budget = budget or Budget(limit_usd=None)
        self.max_retries = max_retries
        self.calls_made = 0
        self.cache_hits = 0
        self.limiter = RateLimiter(
            max_concurrency=max_concurrency,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._sdk = openai.AsyncOpenAI(
            base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=timeout_s
        )

    async def close(self) -> None:
        """Release the HTTP connection pool."""
        await self._sdk.close()

    async def chat(self, request: ChatRequest) -> ChatResult:
        """The completion for `request`: from the cache if this exact call was paid for before."""
        key = request_hash(self.endpoint, request)
        if (cached := cached_result(self.store, key)) is not None:
            self.cache_hits += 1
            return cached
        if key in self._in_flight:  # the same request is on its way already: wait for it, do not pay twice
            await asyncio.shield(self._in_flight[key])
            return await self.chat(request)
        self._in_flight[key] = asyncio.get_running_loop().create_future()
        reserved, result = self.budget.reserve(request, self.endpoint.price), None
        try:
            response = await self._call_with_retries(request)
            self.calls_made += 1
            result = record_response(self.store, self.endpoint, request, response, self.run_id)
            return result
        finally:
            self.budget.settle(reserved, result.cost_usd if result else 0.0)
            self._in_flight.pop(key).set_result(None)

    async def _call_with_retries(self, request: ChatRequest) -> dict[str, Any]:
        payload = request.payload(self.endpoint.model)
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, TRANSIENT_ERRORS)),
            wait=_WaitRetryAfter(),
            stop=stop_after_attempt(self.max_retries + 1),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._attempt(request, payload)
        except openai.AuthenticationError as exc:
            raise AuthenticationError(
                f"{self.endpoint.base_url} rejected the API key (401) — check OPENAI_API_KEY"
            ) from exc
        except openai.NotFoundError as exc:
            raise LLMError(
                f"model '{self.endpoint.model}' not found at {self.endpoint.base_url} — pick another with --model"
            ) from exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise EndpointUnreachableError(
                f"cannot reach the LLM endpoint {self.endpoint.base_url} after {_tries(self.max_retries + 1)} "
                "— check OPENAI_BASE_URL and that the server is up, then re-run (finished work is kept)"
            ) from exc
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            raise RequestRejectedError(f"HTTP {exc.status_code}: {one_line(exc.message)}") from exc
        except openai.APIStatusError as exc:
            raise LLMError(
                f"{self.endpoint.base_url} answered HTTP {exc.status_code} after {_tries(self.max_retries + 1)}: "
                f"{one_line(exc.message)} — re-run later (finished work is kept)"
            ) from exc
        return response

    async def _attempt(self, request: ChatRequest, payload: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request, paced by the rate limiter, which learns from the response's headers."""
        tokens = prompt_tokens(request) + request.max_tokens if self.limiter.counts_tokens else 0
        permit = await self.limiter.acquire(tokens)
        try:
            raw = await self._sdk.chat.completions.with_raw_response.create(**payload)
        except openai.RateLimitError as exc:
            self.limiter.observe(exc.response.headers)
            self.limiter.on_rate_limited(cool_down_s(exc.response.headers), permit)
            log.info(
                "rate limited (429): pausing all requests; now %d in flight at most", self.limiter.concurrency
            )
            raise
        finally:
            self.limiter.release()
        self.limiter.observe(raw.headers)
        self.limiter.on_success()
        return raw.parse().model_dump(mode="json")


def cached_result(store: Store, key: str) -> ChatResult | None:
    """The stored result of the request with hash `key`, if it was ever paid for."""
    row = store.db.execute(
        "SELECT response_json, prompt_tokens, completion_tokens, cost_usd FROM llm_calls WHERE request_hash = ?",
        (key,),
    ).fetchone()
    if row is None:
        return None
    return _result(
        json.loads(row["response_json"]),
        row["prompt_tokens"],
        row["completion_tokens"],
        row["cost_usd"],
        cached=True,
    )


def record_response(
    store: Store,
    endpoint: Endpoint,
    request: ChatRequest,
    response: dict[str, Any],
    run_id: int | None,
    price_factor: float = 1.0,
) -> ChatResult:
    """Store a paid-for completion under its request hash (the cache and the cost ledger) and return it."""
    usage = response.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    price = endpoint.price
    cost = price_factor * (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
    store.db.execute(
        "INSERT OR REPLACE INTO llm_calls(request_hash, stage, model, request_json, response_json,"
        " prompt_tokens, completion_tokens, cost_usd, run_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            request_hash(endpoint, request),
            request.stage,
            endpoint.model,
            json.dumps(request.payload(endpoint.model)),
            json.dumps(response),
            prompt_tokens,
            completion_tokens,
            cost,
            run_id,
            utc_now(),
        ),
    )
    return _result(response, prompt_tokens, completion_tokens, cost, cached=False)


def _result(
    response: dict[str, Any], prompt_tokens: int, completion_tokens: int, cost: float, cached: bool
) -> ChatResult:
    choice = (response.get("choices") or [{}])[0]
    return ChatResult(
        content=(choice.get("message") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=cost,
        cached=cached,
    )


def _tries(n: int) -> str:
    return "1 try" if n == 1 else f"{n} tries"


def one_line(message: str, limit: int = 160) -> str:
    """`message` on one line, cut to `limit` characters."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
