"""The rate limiter on a fake clock, and the client against a rate-limited fake server over real HTTP."""

import asyncio
import dataclasses
import json
import types
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.llm.api import RetryPolicy, _WaitRetryAfter
from finetune_kit.llm.client import ChatRequest, ChatResult, Endpoint, LLMClient
from finetune_kit.llm.rate_limit import (
    MAX_COOL_DOWN_S,
    RateLimiter,
    ServerLimits,
    TokenBucket,
    cool_down_s,
    parse_duration,
    rate_limit_reset_s,
    retry_after_s,
    server_limits,
)
from finetune_kit.llm.window import START_SIZE
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Faults, Reply, docs_responder, openai_duration


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter(clock: FakeClock, **options: Any) -> RateLimiter:
    return RateLimiter(clock=clock, sleep=clock.sleep, **{"max_concurrency": 8, **options})


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def answer(body: dict) -> Reply:
    return Reply("Done.")


# --- Header parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1m30.5s", 90.5),
        ("8.64s", 8.64),
        ("2h0m0s", 7200.0),
        ("250us", 0.00025),
        ("0s", 0.0),
        ("1.5", 1.5),
        (" 20ms ", 0.02),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "1s later", "m5s", "-1s", "nan", "inf"])
def test_parse_duration_rejects_what_it_cannot_read(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize("seconds", [0.12, 1.0, 90.5, 360.0])
def test_the_fake_writes_durations_the_client_reads(seconds: float) -> None:
    assert parse_duration(openai_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "1", "retry-after-ms": "40"}, 0.04),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "9999"}, MAX_COOL_DOWN_S),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    at_2015_10_21_07_28_00 = 1445412480.0

    assert retry_after_s(headers, now=lambda: at_2015_10_21_07_28_00) == seconds


EXHAUSTED_REQUESTS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-tokens": "29000",
    "x-ratelimit-reset-tokens": "2s",
}


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        (EXHAUSTED_REQUESTS, 0.12),
        (
            {
                **EXHAUSTED_REQUESTS,
                "x-ratelimit-remaining-requests": "3",
                "x-ratelimit-remaining-tokens": "0",
            },
            2.0,
        ),
        (
            {**EXHAUSTED_REQUESTS, "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
            120.0,
        ),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "1.5s"}, 1.5),
        ({"x-ratelimit-reset-requests": "later"}, None),
        ({}, None),
    ],
)
def test_rate_limit_reset_is_that_of_the_exhausted_budget(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert rate_limit_reset_s(headers) == seconds


def test_cool_down_prefers_retry_after_over_reset() -> None:
    assert cool_down_s({**EXHAUSTED_REQUESTS, "retry-after-ms": "700"}) == 0.7
    assert cool_down_s(EXHAUSTED_REQUESTS) == 0.12


@pytest.mark.parametrize(
    ("headers", "limits"),
    [
        (EXHAUSTED_REQUESTS, ServerLimits(500, 30000)),
        ({"X-RateLimit-Limit-Requests": "3000"}, ServerLimits(3000, None)),
        ({"x-ratelimit-limit-requests": "0", "x-ratelimit-limit-tokens": "lots"}, ServerLimits(None, None)),
    ],
)
def test_server_limits(headers: dict[str, str], limits: ServerLimits) -> None:
    assert server_limits(headers) == limits


# --- Buckets -------------------------------------------------------------------------------------------


def test_bucket_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket(per_minute=240, capacity=4, now=0.0)  # 4 a second
    bucket.take(4, now=0.0)

    assert bucket.wait_s(1, now=0.0) == 0.25
    assert bucket.wait_s(1, now=0.125) == 0.125
    assert bucket.wait_s(1, now=0.25) == 0.0
    bucket.refill(now=100.0)
    assert bucket.level == 4.0


def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_then_overdraws() -> None:
    bucket = TokenBucket(per_minute=3840, capacity=32, now=0.0)  # 64 a second
    bucket.take(32, now=0.0)

    assert bucket.wait_s(48, now=0.0) == 0.5  # for a full bucket, not for 48
    bucket.take(48, now=0.5)
    assert bucket.level == -16.0
    assert bucket.wait_s(16, now=0.5) == 0.5


def test_requests_are_paced_after_a_burst() -> None:
    clock = FakeClock()
    paced = limiter(clock, requests_per_minute=240, burst_s=1.0)  # 4 a second, a burst of 4

    async def go() -> list[float]:
        times = []
        for _ in range(8):
            await paced.acquire()
            paced.release()
            times.append(clock.now)
        return times

    assert run(go()) == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0]


def test_tokens_are_paced_by_their_own_budget() -> None:
    clock = FakeClock()
    paced = limiter(clock, requests_per_minute=6000, tokens_per_minute=3840)  # 64 tokens a second, burst 32

    async def go() -> list[float]:
        times = []
        for tokens in (32, 16, 16, 48, 8):
            await paced.acquire(tokens)
            paced.release()
            times.append(clock.now)
        return times

    assert run(go()) == [0.0, 0.25, 0.5, 1.0, 1.375]
    assert paced.counts_tokens is True


def test_no_budget_means_no_pacing_and_no_token_counting() -> None:
    clock = FakeClock()
    free = limiter(clock)

    async def go() -> None:
        for _ in range(100):
            await free.acquire(10_000)
            free.release()

    run(go())
    assert (clock.now, free.counts_tokens, free.limits) == (0.0, False, ServerLimits(None, None))


# --- Concurrency, cool-down and AIMD --------------------------------------------------------------------


def test_concurrency_is_bounded_and_slots_are_handed_over_in_order() -> None:
    clock = FakeClock()
    slots = limiter(clock, max_concurrency=2)
    order: list[int] = []

    async def one(n: int) -> None:
        await slots.acquire()
        order.append(n)

    async def go() -> tuple[list[int], list[int]]:
        tasks = [asyncio.ensure_future(one(n)) for n in range(4)]
        await asyncio.sleep(0)
        first = list(order)
        slots.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await asyncio.gather(*tasks[:3])
        tasks[3].cancel()
        return first, list(order)

    assert run(go()) == ([0, 1], [0, 1, 2])


def test_a_retry_is_handed_the_next_slot_ahead_of_first_tries() -> None:
    slots = limiter(FakeClock(), max_concurrency=1)
    order: list[str] = []

    async def one(name: str, retry: bool) -> None:
        await slots.acquire(retry=retry)
        order.append(name)

    async def go() -> list[str]:
        await slots.acquire()
        tasks = [asyncio.ensure_future(one(n, n == "retry")) for n in ("first", "second", "retry")]
        await asyncio.sleep(0)
        slots.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order

    # behind a job's whole fan-out, each retry of an unlucky request would wait the queue again
    assert run(go()) == ["retry"]


def test_a_rate_limit_pauses_every_request_with_one_shared_cool_down() -> None:
    clock = FakeClock()
    paused = limiter(clock)

    async def go() -> list[int]:
        permit = await paused.acquire()
        paused.release()
        paused.on_rate_limited(2.0, permit)
        return list(await asyncio.gather(*(paused.acquire() for _ in range(3))))

    assert run(go()) == [2, 3, 4]
    assert (clock.now, clock.slept) == (2.0, [2.0])


def test_a_rate_limit_without_a_hint_cools_down_for_a_second() -> None:
    clock = FakeClock()
    paused = limiter(clock)

    paused.on_rate_limited(None)

    assert paused.delay_s() == 1.0


def test_a_later_and_longer_cool_down_extends_the_pause_a_shorter_one_does_not() -> None:
    clock = FakeClock()
    paused = limiter(clock)

    paused.on_rate_limited(3.0)
    paused.on_rate_limited(1.0)
    assert paused.delay_s() == 3.0
    clock.now = 2.0
    paused.on_rate_limited(2.0)
    assert paused.delay_s() == 2.0


def test_rate_limits_halve_concurrency_and_rates_once_per_round_in_flight() -> None:
    clock = FakeClock()
    adaptive = limiter(clock, max_concurrency=8, requests_per_minute=600)

    async def go() -> list[tuple[int, float | None]]:
        permits = [await adaptive.acquire() for _ in range(3)]
        seen = []
        for permit in permits:  # three 429s of one round: one cut
            adaptive.on_rate_limited(0.0, permit)
            adaptive.release()
            seen.append((adaptive.concurrency, adaptive.requests_per_minute))
        later = await adaptive.acquire()  # sent after the cut: its 429 cuts again
        adaptive.on_rate_limited(0.0, later)
        adaptive.release()
        seen.append((adaptive.concurrency, adaptive.requests_per_minute))
        return seen

    assert run(go()) == [(4, 300.0), (4, 300.0), (4, 300.0), (2, 150.0)]
    assert adaptive.limits == ServerLimits(600, None)


def test_the_share_never_drops_below_one_request_in_flight() -> None:
    adaptive = limiter(FakeClock(), max_concurrency=8, requests_per_minute=600)

    for _ in range(10):
        adaptive.on_rate_limited(0.0)

    assert (adaptive.share, adaptive.concurrency, adaptive.requests_per_minute) == (0.125, 1, 75.0)


def test_successes_recover_additively_up_to_the_maximum() -> None:
    adaptive = limiter(FakeClock(), max_concurrency=8, requests_per_minute=600)
    adaptive.on_rate_limited(0.0)
    adaptive.on_rate_limited(0.0)
    seen = []

    for _ in range(40):
        adaptive.on_success()
        seen.append(adaptive.concurrency)

    assert seen == sorted(seen)
    assert sorted(set(seen)) == [2, 3, 4, 5, 6, 7, 8]
    assert seen.index(8) == 29  # about one more request in flight per window's worth of successes
    assert (adaptive.share, adaptive.requests_per_minute) == (1.0, 600.0)


def test_a_halved_share_of_a_large_bound_recovers_in_a_few_round_trips() -> None:
    adaptive = limiter(FakeClock(), max_concurrency=256, requests_per_minute=6000)
    adaptive.on_rate_limited(0.0)
    adaptive.on_rate_limited(0.0)  # a quarter: 64 in flight, 1,500 RPM

    for _ in range(1000):  # six round trips of successes (64, 96, ... 224 in flight), and some
        adaptive.on_success()

    # one request per round trip out of 256 would still be under a third of the way back
    assert (adaptive.share, adaptive.requests_per_minute) == (1.0, 6000.0)


def test_a_smaller_window_makes_new_requests_wait() -> None:
    clock = FakeClock()
    adaptive = limiter(clock, max_concurrency=4)

    async def go() -> tuple[bool, bool]:
        for _ in range(3):
            await adaptive.acquire()
        adaptive.on_rate_limited(0.0)  # window 4 -> 2 with 3 in flight
        waiting = asyncio.ensure_future(adaptive.acquire())
        adaptive.release()  # 2 in flight: still full
        await asyncio.sleep(0)
        blocked = not waiting.done()
        adaptive.release()
        await asyncio.sleep(0)
        return blocked, waiting.done()

    assert run(go()) == (True, True)


def failed_try(exc: Exception, attempt: int) -> Any:
    """What the retry policy's wait reads of a failed try: its exception and its number."""
    return types.SimpleNamespace(outcome=types.SimpleNamespace(exception=lambda: exc), attempt_number=attempt)


def status_error(status: int, headers: dict[str, str]) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("POST", "http://127.0.0.1/"))
    kind = openai.RateLimitError if status == 429 else openai.InternalServerError
    return kind("failed", response=response, body=None)


def test_a_429_that_said_when_does_not_grow_the_backoff_of_a_later_500() -> None:
    wait = _WaitRetryAfter(RetryPolicy(max_retries=5, limiter_cools_down=True))
    hinted = status_error(429, {"retry-after-ms": "40", "x-ratelimit-remaining-requests": "7"})

    waits = [
        wait(failed_try(hinted, 1)),
        wait(failed_try(hinted, 2)),
        wait(failed_try(status_error(500, {}), 3)),
    ]

    assert waits[:2] == [0.04, 0.04]  # waited alone, as asked
    assert 0.5 <= waits[2] <= 1.0  # the first 500's backoff, not the third failure's 2 s


# --- Learning the server's limits ---------------------------------------------------------------------


def test_limits_are_learned_from_headers_when_not_configured() -> None:
    clock = FakeClock()
    learner = limiter(clock)

    learner.observe({"x-ratelimit-limit-requests": "240", "x-ratelimit-limit-tokens": "3840"})

    assert learner.limits == ServerLimits(240, 3840)
    assert (learner.requests_per_minute, learner.tokens_per_minute, learner.counts_tokens) == (
        240,
        3840,
        True,
    )
    assert learner.delay_s(1) == 0.25  # a learned budget starts empty: the teaching requests spent some


def test_a_learned_budget_starts_at_what_the_server_says_remains_less_the_requests_sent_since() -> None:
    clock = FakeClock()
    learner = limiter(clock)
    first = learner.sent()
    for _ in range(4):  # sent after the first: its headers cannot count them
        learner.sent()

    learner.observe(
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "9",
            "x-ratelimit-reset-requests": "100ms",
        },
        sent_at=first,
    )

    assert learner.delay_s(5) == 0.0  # 9 left, less 4: five may go at once (starting empty, none could)
    for _ in range(5):
        learner._debit(0)
    assert learner.delay_s() == pytest.approx(0.1)  # then the rate: 10 a second


def test_the_remaining_budget_has_refilled_since_the_request_that_reported_it() -> None:
    clock = FakeClock()
    learner = limiter(clock)
    first = learner.sent()
    clock.now = 1.5  # its response comes back a latency later

    learner.observe(
        {
            "x-ratelimit-limit-requests": "6000",
            "x-ratelimit-remaining-requests": "10",
            "x-ratelimit-reset-requests": "900ms",  # full (100) again after 0.9 s
        },
        sent_at=first,
    )

    bucket = learner._buckets["requests"]
    assert bucket.level == 50  # refilled to the server's 100, of which we trust our own half-second burst


def test_configured_limits_win_over_headers() -> None:
    configured = limiter(FakeClock(), requests_per_minute=60)

    configured.observe({"x-ratelimit-limit-requests": "240", "x-ratelimit-limit-tokens": "3840"})

    assert configured.limits == ServerLimits(60, 3840)


def test_a_rate_limit_that_teaches_the_limit_does_not_cut_below_it() -> None:
    clock = FakeClock()
    learner = limiter(clock)

    async def go() -> None:
        permits = [await learner.acquire() for _ in range(4)]
        for permit in permits:
            learner.observe({"x-ratelimit-limit-requests": "600"})
            learner.on_rate_limited(0.1, permit)
            learner.release()

    run(go())
    assert (learner.share, learner.requests_per_minute, learner.rate_limited) == (1.0, 600.0, 4)


# --- The fake server's rate limit and faults -----------------------------------------------------------


def post_chat(url: str) -> tuple[int, dict[str, str]]:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    headers = {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}


def test_the_fake_answers_beyond_its_rpm_with_openai_rate_limit_headers() -> None:
    with FakeOpenAI(answer, api_key=TEST_KEY, rpm=60) as fake:  # a burst of one request, then one a second
        (ok, ok_headers), (refused, refused_headers) = post_chat(fake.url), post_chat(fake.url)

    assert (ok, refused, fake.rate_limited) == (200, 429, 1)
    limits = {k: v for k, v in ok_headers.items() if k.startswith("x-ratelimit-")}
    assert (limits["x-ratelimit-limit-requests"], limits["x-ratelimit-remaining-requests"]) == ("60", "0")
    assert 0.9 < parse_duration(limits["x-ratelimit-reset-requests"]) <= 1.0
    assert (refused_headers["retry-after"], refused_headers["x-ratelimit-remaining-requests"]) == ("1", "0")
    assert 900 < int(refused_headers["retry-after-ms"]) <= 1000


@pytest.mark.parametrize(
    ("roll", "fault"),
    [(0.1, "rate_limited"), (0.22, "server_error"), (0.26, "timeout"), (0.3, "malformed"), (0.5, None)],
)
def test_faults_are_drawn_by_their_shares(roll: float, fault: str | None) -> None:
    faults = Faults(rate_limited=0.2, server_error=0.05, timeout=0.02, malformed=0.05)

    assert faults.pick(roll) == fault


# --- Over real HTTP ------------------------------------------------------------------------------------


def endpoint_for(url: str) -> Endpoint:
    return Endpoint(base_url=url, api_key=TEST_KEY, model="gpt-4o-mini", identity="fake-server")


def distinct_requests(n: int) -> list[ChatRequest]:
    base = ChatRequest(
        stage="questions",
        messages=(("user", "Write a question about Acme."),),
        temperature=0.0,
        max_tokens=16,
        template_version="p1:000000000000",
    )
    return [dataclasses.replace(base, attempt=i) for i in range(n)]


def chat_all(url: str, store: Store, n: int, **options: Any) -> tuple[list[ChatResult], LLMClient]:
    async def go() -> tuple[list[ChatResult], LLMClient]:
        client = LLMClient(endpoint_for(url), store, max_retries=5, timeout_s=5.0, **options)
        try:
            return list(await asyncio.gather(*(client.chat(r) for r in distinct_requests(n)))), client
        finally:
            await client.close()

    return run(go())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "s.db") as opened:
        yield opened


def test_a_configured_budget_is_never_refused(store: Store) -> None:
    with FakeOpenAI(answer, api_key=TEST_KEY, rpm=600) as fake:
        results, client = chat_all(fake.url, store, 60, max_concurrency=8, requests_per_minute=600)

    assert (fake.rate_limited, len(fake.requests), client.limiter.rate_limited) == (0, 60, 0)
    assert [r.content for r in results] == ["Done."] * 60


def test_an_unconfigured_budget_is_learned_from_headers_and_every_request_completes(store: Store) -> None:
    with FakeOpenAI(answer, api_key=TEST_KEY, rpm=600) as fake:
        results, client = chat_all(fake.url, store, 60, max_concurrency=16)

    assert [r.content for r in results] == ["Done."] * 60
    assert client.limiter.limits == ServerLimits(600, None)
    # only the first round, sent blind before the limit was known, beyond the server's burst of 10
    assert fake.rate_limited <= START_SIZE - 10
    assert (client.limiter.rate_limited, len(fake.requests)) == (fake.rate_limited, 60 + fake.rate_limited)
    assert fake.invalid_requests == []


def test_requests_waiting_when_a_token_budget_is_learned_are_charged_for_their_tokens(store: Store) -> None:
    with FakeOpenAI(answer, api_key=TEST_KEY, tpm=12_000) as fake:  # 200 tokens a second, ~21 a request
        results, client = chat_all(fake.url, store, 40, max_concurrency=4)

    assert [r.content for r in results] == ["Done."] * 40
    assert client.limiter.limits == ServerLimits(None, 12_000)
    # every request was asked for before the budget was known; charged nothing, they drew 429s by the dozen
    assert fake.rate_limited == 0


# --- Settings ------------------------------------------------------------------------------------------


def test_a_configured_requests_per_minute_paces_the_pipeline(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(docs_responder, api_key=TEST_KEY, rpm=1200) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        monkeypatch.setenv("FTKIT_MAX_CONCURRENCY", "32")  # the first round (one request per chunk) bursts
        monkeypatch.setenv("FTKIT_REQUESTS_PER_MINUTE", "1200")
        result = runner.invoke(
            app, ["--workspace", "ws", "run", str(SAMPLE_DOCS), "--questions-per-chunk", "1"]
        )

    assert result.exit_code == 0, result.stderr
    # Unconfigured, this run draws 429s: its first round (one request per chunk) bursts past the server's 20.
    assert (fake.rate_limited, fake.invalid_requests) == (0, [])
    assert len(fake.requests) > 40


@pytest.mark.parametrize("name", ["requests_per_minute", "tokens_per_minute"])
def test_a_budget_must_be_positive(tmp_path: Path, name: str) -> None:
    (tmp_path / "ftkit.toml").write_text(f"{name} = 0\n")

    with pytest.raises(ConfigError) as excinfo:
        load_settings(tmp_path / "ftkit.toml")

    assert str(excinfo.value) == (
        f"invalid setting '{name}': Input should be greater than or equal to 1 — fix it in"
        f" {tmp_path / 'ftkit.toml'}, FTKIT_{name.upper()} or the matching flag"
    )


def test_budgets_default_to_learning_from_the_server() -> None:
    settings = load_settings()

    assert (settings.requests_per_minute, settings.tokens_per_minute) == (None, None)
