import asyncio
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.config import ModelPrice
from finetune_kit.errors import AuthenticationError, EndpointUnreachableError, LLMError, RequestRejectedError
from finetune_kit.llm.client import ChatRequest, ChatResult, Endpoint, LLMClient, request_hash
from finetune_kit.store import Store
from tests.conftest import TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply

PRICE = ModelPrice(input=2.0, output=8.0)
REQUEST = ChatRequest(
    stage="questions",
    messages=(("system", "You write support questions."), ("user", "Write two questions about Acme ports.")),
    temperature=0.7,
    max_tokens=64,
    template_version="p1:000000000000",
)
CONTENT = "1. Which port does Acme use?\n2. How do I change it?"
# The fake counts tokens as whitespace-separated words.
PROMPT_WORDS = 4 + 6
COMPLETION_WORDS = 12
RETRY_NOW = {"Retry-After": "0"}


def fixed_reply(body: dict) -> Reply:
    return Reply(content=CONTENT)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(fixed_reply, api_key=TEST_KEY) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "s.db") as opened:
        yield opened


def endpoint_for(url: str, api_key: str = TEST_KEY) -> Endpoint:
    return Endpoint(base_url=url, api_key=api_key, model="gpt-4o-mini", identity="fake-server", price=PRICE)


def chat(
    endpoint: Endpoint,
    store: Store,
    *requests: ChatRequest,
    max_retries: int = 2,
    max_concurrency: int = 4,
    timeout_s: float = 5.0,
) -> list[ChatResult]:
    """Run the requests concurrently on one fresh client; the first failure propagates."""

    async def run() -> list[ChatResult]:
        client = LLMClient(
            endpoint,
            store,
            max_concurrency=max_concurrency,
            max_retries=max_retries,
            timeout_s=timeout_s,
            run_id=None,
        )
        try:
            return list(await asyncio.gather(*(client.chat(r) for r in requests)))
        finally:
            await client.close()

    return asyncio.run(run())


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_first_call_goes_to_the_server_and_is_recorded(fake: FakeOpenAI, store: Store) -> None:
    endpoint = endpoint_for(fake.url)

    [result] = chat(endpoint, store, REQUEST)

    cost = (PROMPT_WORDS * 2.0 + COMPLETION_WORDS * 8.0) / 1_000_000
    assert result == ChatResult(CONTENT, "stop", PROMPT_WORDS, COMPLETION_WORDS, cost, cached=False)
    assert fake.requests == [
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You write support questions."},
                {"role": "user", "content": "Write two questions about Acme ports."},
            ],
            "temperature": 0.7,
            "max_tokens": 64,
            "seed": 0,
        }
    ]
    assert fake.invalid_requests == []
    row = store.db.execute("SELECT * FROM llm_calls").fetchone()
    assert (row["request_hash"], row["stage"], row["model"]) == (
        request_hash(endpoint, REQUEST),
        "questions",
        "gpt-4o-mini",
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (
        PROMPT_WORDS,
        COMPLETION_WORDS,
        cost,
    )
    assert json.loads(row["request_json"]) == fake.requests[0]
    assert json.loads(row["response_json"])["choices"][0]["message"]["content"] == CONTENT


def test_api_key_is_not_stored(fake: FakeOpenAI, store: Store) -> None:
    chat(endpoint_for(fake.url), store, REQUEST)

    dump = "\n".join(store.db.iterdump())
    assert TEST_KEY not in dump


def test_identical_request_is_a_cache_hit(fake: FakeOpenAI, store: Store) -> None:
    endpoint = endpoint_for(fake.url)
    [first] = chat(endpoint, store, REQUEST)

    [again] = chat(endpoint, store, REQUEST)

    assert again == dataclasses.replace(first, cached=True)
    assert len(fake.requests) == 1
    assert store.scalar("SELECT count(*) FROM llm_calls") == 1


def test_cache_survives_reopening_the_store(fake: FakeOpenAI, tmp_path: Path) -> None:
    endpoint = endpoint_for(fake.url)
    with Store(tmp_path / "s.db") as store:
        chat(endpoint, store, REQUEST)

    with Store(tmp_path / "s.db") as store:
        [again] = chat(endpoint, store, REQUEST)

    assert (again.cached, again.content, len(fake.requests)) == (True, CONTENT, 1)


def test_client_counts_calls_and_hits(fake: FakeOpenAI, store: Store) -> None:
    async def run() -> tuple[int, int]:
        client = LLMClient(endpoint_for(fake.url), store, max_concurrency=1, max_retries=0, timeout_s=5)
        try:
            for _ in range(3):
                await client.chat(REQUEST)
        finally:
            await client.close()
        return client.calls_made, client.cache_hits

    assert asyncio.run(run()) == (1, 2)


@pytest.mark.parametrize(
    "changed",
    [
        {"temperature": 0.2},
        {"template_version": "p1:111111111111"},
        {"attempt": 1},
        {"stop": ("\n3.",)},
        {"max_tokens": 65},
        {"stage": "answers"},
        {"messages": (("user", "Write two questions about Acme logs."),)},
    ],
)
def test_a_different_request_is_a_miss(fake: FakeOpenAI, store: Store, changed: dict) -> None:
    endpoint = endpoint_for(fake.url)
    chat(endpoint, store, REQUEST)

    [result] = chat(endpoint, store, dataclasses.replace(REQUEST, **changed))

    assert (result.cached, len(fake.requests)) == (False, 2)
    assert store.scalar("SELECT count(*) FROM llm_calls") == 2
    assert fake.invalid_requests == []


@pytest.mark.parametrize(
    ("changed", "sent"),
    [
        ({"attempt": 2}, {"seed": 2}),
        ({"stop": ("\n3.", "\n\n")}, {"seed": 0, "stop": ["\n3.", "\n\n"]}),
        ({"template_version": "p1:111111111111"}, {"seed": 0}),
    ],
)
def test_request_fields_in_the_payload(fake: FakeOpenAI, store: Store, changed: dict, sent: dict) -> None:
    chat(endpoint_for(fake.url), store, dataclasses.replace(REQUEST, **changed))

    base = {"model", "messages", "temperature", "max_tokens"}
    assert {k: v for k, v in fake.requests[0].items() if k not in base} == sent


@pytest.mark.parametrize(
    "endpoint_change",
    [{"identity": "another-server"}, {"model": "fake-model"}],
)
def test_another_endpoint_or_model_is_a_miss(fake: FakeOpenAI, store: Store, endpoint_change: dict) -> None:
    endpoint = endpoint_for(fake.url)
    chat(endpoint, store, REQUEST)

    [result] = chat(dataclasses.replace(endpoint, **endpoint_change), store, REQUEST)

    assert (result.cached, len(fake.requests)) == (False, 2)


def test_the_api_key_is_not_part_of_the_cache_key(fake: FakeOpenAI, store: Store) -> None:
    endpoint = endpoint_for(fake.url)

    assert request_hash(endpoint, REQUEST) == request_hash(
        dataclasses.replace(endpoint, api_key="sk-other"), REQUEST
    )
    assert TEST_KEY not in repr(endpoint)


@pytest.mark.parametrize(
    "failure",
    [
        Reply(status=429, headers=RETRY_NOW),
        Reply("overloaded", status=500, headers=RETRY_NOW),
        Reply("bad gateway", status=502, headers=RETRY_NOW),
        Reply("unavailable", status=503, headers=RETRY_NOW),
    ],
)
def test_transient_failure_then_success_is_retried(fake: FakeOpenAI, store: Store, failure: Reply) -> None:
    fake.queue(failure)

    [result] = chat(endpoint_for(fake.url), store, REQUEST, max_retries=2)

    assert (result.content, result.cached, len(fake.requests)) == (CONTENT, False, 2)
    assert store.scalar("SELECT count(*) FROM llm_calls") == 1


def test_retries_exhausted_raises_llm_error(fake: FakeOpenAI, store: Store) -> None:
    fake.queue(*[Reply("the model is overloaded", status=500, headers=RETRY_NOW)] * 3)

    with pytest.raises(LLMError) as excinfo:
        chat(endpoint_for(fake.url), store, REQUEST, max_retries=2)

    assert type(excinfo.value) is LLMError
    assert str(excinfo.value) == (
        f"{fake.url} answered HTTP 500 after 3 tries: Error code: 500 - the model is overloaded "
        "— re-run later (finished work is kept)"
    )
    assert len(fake.requests) == 3
    assert store.scalar("SELECT count(*) FROM llm_calls") == 0


def test_rate_limit_exhausted_raises_llm_error(fake: FakeOpenAI, store: Store) -> None:
    fake.queue(*[Reply(status=429, headers=RETRY_NOW)] * 2)

    with pytest.raises(LLMError) as excinfo:
        chat(endpoint_for(fake.url), store, REQUEST, max_retries=1)

    assert str(excinfo.value) == (
        f"{fake.url} answered HTTP 429 after 2 tries: Error code: 429 - Rate limit reached for requests. "
        "Please try again later. — re-run later (finished work is kept)"
    )
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            Reply("'max_tokens' is too large", status=400),
            "HTTP 400: Error code: 400 - 'max_tokens' is too large",
        ),
        (Reply(status=422), "HTTP 422: Error code: 422 - Unprocessable entity."),
    ],
)
def test_rejected_request_is_not_retried(fake: FakeOpenAI, store: Store, reply: Reply, message: str) -> None:
    fake.queue(reply)

    with pytest.raises(RequestRejectedError) as excinfo:
        chat(endpoint_for(fake.url), store, REQUEST, max_retries=3)

    assert str(excinfo.value) == message
    assert len(fake.requests) == 1


def test_unknown_model_names_the_model(fake: FakeOpenAI, store: Store) -> None:
    fake.queue(Reply(status=404))

    with pytest.raises(LLMError) as excinfo:
        chat(endpoint_for(fake.url), store, REQUEST, max_retries=3)

    assert str(excinfo.value) == f"model 'gpt-4o-mini' not found at {fake.url} — pick another with --model"
    assert len(fake.requests) == 1


def test_wrong_key_raises_authentication_error_without_the_key(fake: FakeOpenAI, store: Store) -> None:
    wrong_key = "sk-wrong-key-that-must-not-leak"

    with pytest.raises(AuthenticationError) as excinfo:
        chat(endpoint_for(fake.url, api_key=wrong_key), store, REQUEST, max_retries=3)

    assert str(excinfo.value) == f"{fake.url} rejected the API key (401) — check OPENAI_API_KEY"
    assert wrong_key not in str(excinfo.value)
    assert len(fake.requests) == 1


def test_closed_port_raises_endpoint_unreachable(store: Store) -> None:
    url = closed_port_url()

    with pytest.raises(EndpointUnreachableError) as excinfo:
        chat(endpoint_for(url), store, REQUEST, max_retries=0)

    assert str(excinfo.value) == (
        f"cannot reach the LLM endpoint {url} after 1 try — check OPENAI_BASE_URL and that the server is up, "
        "then re-run (finished work is kept)"
    )


def test_timeout_raises_endpoint_unreachable(fake: FakeOpenAI, store: Store) -> None:
    fake.queue(Reply(CONTENT, delay_s=5))

    with pytest.raises(EndpointUnreachableError) as excinfo:
        chat(endpoint_for(fake.url), store, REQUEST, max_retries=0, timeout_s=0.2)

    assert str(excinfo.value).startswith(f"cannot reach the LLM endpoint {fake.url} after 1 try — ")
    assert store.scalar("SELECT count(*) FROM llm_calls") == 0


def test_truncated_reply_keeps_finish_reason(fake: FakeOpenAI, store: Store) -> None:
    fake.queue(Reply("1. Which port does", finish_reason="length"))
    endpoint = endpoint_for(fake.url)

    [first] = chat(endpoint, store, REQUEST)
    [again] = chat(endpoint, store, REQUEST)

    assert (first.finish_reason, again.finish_reason, again.cached) == ("length", "length", True)


class InFlight:
    """A responder that holds each request for a while and records the most ever served at once."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.now = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.hold_s)
        with self.lock:
            self.now -= 1
        return Reply(content="Done?")


def test_concurrency_is_bounded(store: Store) -> None:
    responder = InFlight(hold_s=0.1)
    requests = [dataclasses.replace(REQUEST, attempt=i) for i in range(6)]

    with FakeOpenAI(responder, api_key=TEST_KEY) as server:
        results = chat(endpoint_for(server.url), store, *requests, max_concurrency=2)
        served = len(server.requests)

    assert (responder.most, served, [r.content for r in results]) == (2, 6, ["Done?"] * 6)


def test_identical_requests_in_flight_at_once_are_paid_for_once(store: Store) -> None:
    with FakeOpenAI(InFlight(hold_s=0.2), api_key=TEST_KEY) as server:
        results = chat(endpoint_for(server.url), store, REQUEST, REQUEST, REQUEST, max_concurrency=3)
        served = len(server.requests)

    assert (served, [r.cached for r in results]) == (1, [False, True, True])
