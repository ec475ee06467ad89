"""The concurrency window: Little's law over the allowed rate and the observed latency, slow start before that."""

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient
from finetune_kit.llm.rate_limit import RateLimiter, pauses_everyone
from finetune_kit.llm.window import Window
from finetune_kit.store import Store
from tests.conftest import TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def complete(window: Window, clock: Clock, latency_s: float, n: int = 1, tokens: int = 0) -> None:
    for _ in range(n):
        sent = window.sent(tokens)
        clock.now += latency_s
        window.completed(sent)


def test_slow_start_doubles_once_per_window_of_completions_up_to_the_bound() -> None:
    clock = Clock()
    window = Window(max_size=80, start=4, clock=clock)
    sizes = [window.size()]
    for _ in range(6):
        complete(window, clock, 0.2, n=window.size())
        sizes.append(window.size())

    assert sizes == [4, 8, 16, 32, 64, 80, 80]


def test_the_first_round_is_sixteen_requests() -> None:
    assert Window(max_size=256).size() == 16  # sent blind: no rate, no latency known yet
    assert Window(max_size=8).size() == 8


def test_while_nothing_has_come_back_the_window_doubles_every_half_second() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    window.sent()
    sizes = []
    for _ in range(5):
        sizes.append(window.size())
        clock.now += 0.5

    assert sizes == [16, 32, 64, 128, 256]  # a silence of t says the latency is at least t
    assert window.grows_in() is None  # at the bound


def test_any_response_ends_the_silent_growth() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    window.sent()
    clock.now += 0.5
    assert (window.size(), window.grows_in()) == (32, pytest.approx(0.5 * math.log2(33 / 16) - 0.5))
    window.heard()  # a 429 or a 500, say: the server answers, and says how fast

    assert (window.size(), window.grows_in()) == (16, None)


def test_a_refusal_seen_by_the_limiter_ends_the_silent_growth() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    limiter = RateLimiter(max_concurrency=256, clock=clock, window=window)
    limiter.sent()
    clock.now += 1.0
    assert limiter.concurrency == 64
    limiter.observe({"retry-after": "1"})  # the headers of a 429

    assert limiter.concurrency == 16


def test_slow_start_stops_growing_when_the_latency_says_the_server_queues() -> None:
    clock = Clock()
    window = Window(max_size=256, start=4, clock=clock)
    complete(window, clock, 0.1, n=4)  # 8 now
    complete(window, clock, 1.0, n=8)  # the EWMA passes twice the fastest response

    assert (window.queueing, window.size()) == (True, 8)


def test_the_window_jumps_to_rate_times_latency_times_headroom_once_both_are_known() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    assert window.size() == 16  # no rate, no latency yet: slow start
    complete(window, clock, 1.5)

    assert window.size(requests_per_minute=6000) == 180  # 100/s × 1.5 s × 1.2
    assert window.size(requests_per_minute=60000) == 256  # the bound a user may set
    assert window.size() == 16  # no rate: still the slow start


@pytest.mark.parametrize("rates", [{"requests_per_minute": 6000}, {"tokens_per_minute": 600_000}])
def test_a_rate_known_before_any_latency_leaves_the_first_round_to_the_pacing(rates: dict) -> None:
    window = Window(max_size=256, clock=Clock())

    assert window.size(**rates) == 256  # the buckets send at the rate: rate × latency is what is out at once


def test_the_token_budget_binds_when_requests_are_large() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    complete(window, clock, 1.0, tokens=1000)

    # 60,000 TPM / 1,000 tokens = 1 request/s; 6,000 RPM alone would allow 100/s
    assert window.size(requests_per_minute=6000, tokens_per_minute=60_000) == 2  # ceil(1 × 1.0 × 1.2)


def test_the_latency_is_an_ewma_of_successful_responses() -> None:
    clock = Clock()
    window = Window(max_size=256, clock=clock)
    complete(window, clock, 1.0)
    complete(window, clock, 2.0)

    assert window.latency_s == pytest.approx(1.2)
    assert window.size(requests_per_minute=600) == 15  # 10/s × 1.2 s × 1.2 = 14.4


def test_an_overload_halves_the_slow_start() -> None:
    clock = Clock()
    window = Window(max_size=256, start=4, clock=clock)
    complete(window, clock, 0.1, n=4 + 8)
    assert window.size() == 16
    window.overloaded()

    assert window.size() == 8


def test_the_limiter_allows_the_smaller_of_its_bound_and_the_window() -> None:
    clock = Clock()
    window = Window(max_size=64, clock=clock)
    limiter = RateLimiter(max_concurrency=64, requests_per_minute=600, clock=clock, window=window)
    assert limiter.concurrency == 64  # a configured rate paces the first round
    complete(window, clock, 2.0)
    assert limiter.concurrency == 24  # 10/s × 2 s × 1.2
    limiter.on_rate_limited(0.0)  # the share halves the rate, so the window too

    assert limiter.concurrency == 12


@pytest.mark.parametrize(
    ("headers", "shared"),
    [
        ({"x-ratelimit-remaining-requests": "0", "retry-after": "1"}, True),
        ({"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "0"}, True),
        ({"x-ratelimit-remaining-requests": "12", "retry-after": "1"}, False),
        ({"retry-after": "1"}, False),
        ({}, True),
    ],
)
def test_only_a_429_that_spent_the_budget_pauses_everyone(headers: dict[str, str], shared: bool) -> None:
    assert pauses_everyone(headers) is shared


class Slow:
    """Answers after `delay_s`, counting the requests in flight at once and those that came before any answer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.now, self.most = delay_s, 0, 0
        self.before_first_answer, self.answered = 0, False
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.before_first_answer += not self.answered
        time.sleep(self.delay_s)
        with self.lock:
            self.now -= 1
            self.answered = True
        return Reply("Done.")


def chat_with_no_settings(tmp_path: Path, responder: Slow, n: int) -> int:
    """Send n distinct requests with no tuning settings to a 6,000 RPM fake; returns the 429s its cap gave."""
    request = ChatRequest("bench", (("user", "Hi"),), 0.0, 16, "v1")
    with Store(tmp_path / "s.db") as store, FakeOpenAI(responder, api_key=TEST_KEY, rpm=6000) as fake:
        endpoint = Endpoint(base_url=fake.url, api_key=TEST_KEY, model="gpt-4o-mini", identity="t")

        async def go() -> None:
            client = LLMClient(endpoint, store, max_concurrency=256, max_retries=4, timeout_s=10)
            try:
                requests = [dataclasses.replace(request, attempt=i) for i in range(n)]
                await asyncio.gather(*(client.chat(r) for r in requests))
            finally:
                await client.close()

        asyncio.run(go())
    return fake.rate_limited


def test_with_no_settings_the_requests_in_flight_grow_to_what_the_server_allows(tmp_path: Path) -> None:
    responder = Slow(0.5)
    rate_limited = chat_with_no_settings(tmp_path, responder, 120)

    assert responder.most > 16  # the old fixed default allowed 8
    assert rate_limited == 0


def test_a_server_that_takes_a_second_gets_more_than_the_first_round_before_it_answers(
    tmp_path: Path,
) -> None:
    responder = Slow(1.0)
    rate_limited = chat_with_no_settings(tmp_path, responder, 100)

    # 16 blind, doubling each half second of silence: 64 by the time the first answer comes, whatever the jitter
    assert responder.before_first_answer > 32
    assert rate_limited == 0


def test_an_endpoint_that_serves_one_at_a_time_caps_the_client_whatever_the_bound(tmp_path: Path) -> None:
    responder = Slow(0.05)
    request = ChatRequest("bench", (("user", "Hi"),), 0.0, 16, "v1")
    with Store(tmp_path / "s.db") as store, FakeOpenAI(responder, api_key=TEST_KEY) as fake:
        endpoint = Endpoint(
            base_url=fake.url, api_key=TEST_KEY, model="gpt-4o-mini", identity="t", max_in_flight=1
        )

        async def go() -> int:
            client = LLMClient(endpoint, store, max_concurrency=256, max_retries=4, timeout_s=10)
            try:
                requests = [dataclasses.replace(request, attempt=i) for i in range(6)]
                await asyncio.gather(*(client.chat(r) for r in requests))
                return client.limiter.concurrency
            finally:
                await client.close()

        allowed = asyncio.run(go())

    assert (responder.most, allowed) == (1, 1)


def test_the_embedded_server_says_it_serves_one_request_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_kit.config import load_settings
    from finetune_kit.llm import endpoint as endpoints
    from finetune_kit.llm.local_server import LocalServer

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))

    @contextlib.contextmanager
    def started(settings: object) -> Iterator[LocalServer]:
        yield LocalServer(base_url="http://127.0.0.1:9/v1", model_path=model, pid=0)

    monkeypatch.setattr(endpoints, "local_server", started)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    settings = load_settings(workspace=tmp_path / "ws")
    with endpoints.open_endpoint(settings.model_copy(update={"provider": "local"})) as local:
        assert local.max_in_flight == 1
    with endpoints.open_endpoint(settings.model_copy(update={"provider": "openai"})) as remote:
        assert remote.max_in_flight is None  # a remote server's limits come from its headers
