"""Async chat completions with bounded concurrency, retries, a request cache and a cost ledger."""

import asyncio
import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from finetune_kit.llm.api import ChatAPI, Endpoint, RetryPolicy, Wording
from finetune_kit.llm.budget import Budget, prompt_tokens
from finetune_kit.llm.rate_limit import RateLimiter
from finetune_kit.llm.window import Window
from finetune_kit.store import Store, utc_now

__all__ = [
    "ChatRequest",
    "ChatResult",
    "Endpoint",
    "LLMClient",
    "cached_result",
    "record_response",
    "request_hash",
]

GENERATION_WORDING = Wording(
    refused_key="{url} rejected the API key (401) — check OPENAI_API_KEY",
    unreachable="cannot reach the LLM endpoint {url}{tries} — check OPENAI_BASE_URL and that the server is up,"
    " then re-run (finished work is kept)",
    forbidden="{url} refused the request (HTTP 403): {message} — check that the key may use model '{model}'",
    not_found="model '{model}' not found at {url} — pick another with --model",
    rejected="HTTP {status}: {message}",
    failed="{url} answered HTTP {status}{tries}: {message} — re-run later (finished work is kept)",
)


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


class LLMClient:
    """Cached, retried, concurrency-bounded chat completions against one endpoint.

    `max_concurrency` is the user's upper bound; the window under it follows the server, and an endpoint that
    serves only so many at once (the embedded model) caps it itself, so no caller decides per provider.
    """

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
        self.calls_made = 0
        self.cache_hits = 0
        bound = min(
            max_concurrency, endpoint.max_in_flight or max_concurrency
        )  # the server's own, if smaller
        limiter = RateLimiter(
            max_concurrency=bound,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            window=Window(max_size=bound),
        )
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self.api = ChatAPI(endpoint, limiter, timeout_s=timeout_s, wording=GENERATION_WORDING)
        self.policy = RetryPolicy(max_retries, limiter_cools_down=True)

    @property
    def limiter(self) -> RateLimiter:
        """The pacing of this client's requests (rates, concurrency, 429s seen)."""
        return self.api.limiter

    async def close(self) -> None:
        """Release the HTTP connection pool."""
        await self.api.close()

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
            payload = request.payload(self.endpoint.model)
            estimate = functools.partial(prompt_tokens, request)  # counted only when the request goes out
            response = await self.api.complete(payload, self.policy, prompt_tokens=estimate)
            self.calls_made += 1
            result = record_response(self.store, self.endpoint, request, response, self.run_id)
            return result
        finally:
            self.budget.settle(reserved, result.cost_usd if result else 0.0)
            self._in_flight.pop(key).set_result(None)


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
