"""Client-side rate limiting: request and token budgets per minute, a shared cool-down after a 429, and AIMD."""

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from finetune_kit.llm.window import Window

RECENT_SENDS = 4096  # sends remembered, to replay those the server had not yet counted in a header
MIN_GROWTH_WAKE_S = 0.02  # the silent growth hands out slots no more often than this
RECOVERY_PER_ROUND = 1 / 8  # of the share, added back per round trip of successes after a cut
MAX_COOL_DOWN_S = 120.0  # a longer wait is a quota problem, and the retry budget will say so
DEFAULT_COOL_DOWN_S = 1.0  # after a 429 that says nothing about when to come back
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {
    "h": (3600, 1),
    "m": (60, 1),
    "s": (1, 1),
    "ms": (1, 10**3),
    "us": (1, 10**6),
    "µs": (1, 10**6),
    "ns": (1, 10**9),
}

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration as OpenAI writes them ("6m0s", "120ms", "1m30.5s"), or None."""
    text = text.strip()
    if (seconds := _number(text)) is not None:
        return max(seconds, 0.0)  # a bare number is seconds
    total, position = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            return None
        multiplier, divisor = _UNIT_S[part.group(2)]
        total += float(part.group(1)) * multiplier / divisor  # divided, so "120ms" is exactly 0.12
        position = part.end()
    return total if text and position == len(text) else None


def retry_after_s(headers: Mapping[str, str], now: Clock = time.time) -> float | None:
    """The wait a response asks for in `retry-after-ms` or `retry-after` (seconds or an HTTP date), or None."""
    lower = _lower(headers)
    if (ms := _number(lower.get("retry-after-ms"))) is not None:
        return _bounded(ms / 1000)
    value = lower.get("retry-after")
    if value is None:
        return None
    if (seconds := _number(value)) is not None:
        return _bounded(seconds)
    try:
        return _bounded(parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


def rate_limit_reset_s(headers: Mapping[str, str]) -> float | None:
    """When an exhausted x-ratelimit budget is back (`x-ratelimit-reset-*`), or None if the headers do not say."""
    lower = _lower(headers)
    resets = {
        kind: parse_duration(lower.get(f"x-ratelimit-reset-{kind}", "")) for kind in ("requests", "tokens")
    }
    exhausted = [kind for kind in resets if lower.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"]
    waits = [resets[kind] for kind in exhausted or resets]
    known = [wait for wait in waits if wait is not None]
    return _bounded(max(known)) if known else None


def pauses_everyone(headers: Mapping[str, str]) -> bool:
    """True when a 429 means the shared budget is spent: a `x-ratelimit-remaining-*` of 0, or nothing said.

    A 429 with budget left, or one that only says when to retry (`Retry-After`), is about that request (a
    burst, a fault): it waits what it must, and the others go on.
    """
    lower = _lower(headers)
    remaining = [lower.get(f"x-ratelimit-remaining-{kind}") for kind in ("requests", "tokens")]
    if any(value is not None and value.strip() == "0" for value in remaining):
        return True
    if any(value is not None for value in remaining):
        return False
    return retry_after_s(headers) is None


def cool_down_s(headers: Mapping[str, str], now: Clock = time.time) -> float | None:
    """How long a 429 asks every request to hold off: Retry-After first, else the reset of the exhausted budget."""
    hinted = retry_after_s(headers, now)
    return hinted if hinted is not None else rate_limit_reset_s(headers)


@dataclass(frozen=True)
class ServerLimits:
    """The budgets per minute a server announces in `x-ratelimit-limit-*` headers (None where it does not)."""

    requests_per_minute: int | None
    tokens_per_minute: int | None


def server_limits(headers: Mapping[str, str]) -> ServerLimits:
    """Read `x-ratelimit-limit-requests` and `x-ratelimit-limit-tokens`; non-positive or malformed ones are None."""
    lower = _lower(headers)

    def limit(kind: str) -> int | None:
        value = _number(lower.get(f"x-ratelimit-limit-{kind}"))
        return int(value) if value is not None and value >= 1 else None

    return ServerLimits(limit("requests"), limit("tokens"))


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _bounded(seconds: float) -> float:
    return min(max(seconds, 0.0), MAX_COOL_DOWN_S)


class TokenBucket:
    """A budget refilled continuously at `per_minute` / 60 a second up to `capacity`; a debit may overdraw it."""

    def __init__(
        self, per_minute: float, capacity: float, now: float, *, full: bool = True, level: float | None = None
    ) -> None:
        self.per_minute = per_minute
        self.capacity = capacity
        self.level = level if level is not None else capacity if full else 0.0
        self._updated = now

    def refill(self, now: float) -> None:
        """Add what has dripped in since the last look (a level granted above the capacity is kept, not topped up)."""
        elapsed = max(0.0, now - self._updated)
        self.level = max(self.level, min(self.capacity, self.level + elapsed * self.per_minute / 60))
        self._updated = max(self._updated, now)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be taken; more than the capacity waits for a full bucket (then overdraws)."""
        self.refill(now)
        missing = min(amount, self.capacity) - self.level
        return missing * 60 / self.per_minute if missing > 1e-9 else 0.0

    def take(self, amount: float, now: float) -> None:
        """Debit `amount`, possibly below zero (a request larger than the burst pays its debt by waiting)."""
        self.refill(now)
        self.level -= amount

    def set_rate(self, per_minute: float, now: float) -> None:
        """Change the refill rate from now on."""
        self.refill(now)
        self.per_minute = per_minute


class RateLimiter:
    """Paces requests under request and token budgets, pauses everyone after a 429, and adapts (AIMD).

    `share` is the fraction of the configured concurrency and rates in use: a 429 halves it (once per round of
    requests in flight), each success adds about one request of concurrency per round trip, up to all of it.
    Budgets left unset are learned from the server's `x-ratelimit-limit-*` headers.
    """

    def __init__(
        self,
        *,
        max_concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        burst_s: float = 0.5,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        window: Window | None = None,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.window = window  # None: `max_concurrency` × share alone bounds the requests in flight
        self.burst_s = burst_s  # below a server's usual second of burst, so network jitter cannot overdraw it
        self.share = 1.0
        self.cool_down_until = -math.inf
        self.rate_limited = 0
        self.configured = ServerLimits(requests_per_minute, tokens_per_minute)
        self._clock, self._sleep = clock, sleep
        self._base = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._buckets: dict[str, TokenBucket] = {}
        for kind, per_minute in self._base.items():
            if per_minute is not None:
                self._buckets[kind] = self._new_bucket(per_minute, full=True)
        self._in_use = 0
        self._issued = 0
        self._cut_after = 0  # permits issued before the last cut do not cut again
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._pacing = asyncio.Lock()
        self._sends: deque[tuple[float, int]] = deque(maxlen=RECENT_SENDS)  # (sent at, tokens)
        self._heard = False  # a response has told whether the server has budgets
        self._growth_timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None

    @property
    def concurrency(self) -> int:
        """Requests allowed in flight now: the configured bound × share, and at most the window."""
        bound = max(1, math.floor(self.max_concurrency * self.share + 1e-9))
        if self.window is None:
            return bound
        return min(bound, self.window.size(self.requests_per_minute, self.tokens_per_minute))

    @property
    def in_flight(self) -> int:
        """Requests holding a slot now."""
        return self._in_use

    def sent(self, tokens: int = 0) -> float:
        """Note a request going out now (for the window's latency and the budgets' replay); returns its start time."""
        sent_at = self.window.sent(tokens) if self.window else self._clock()
        self._sends.append((sent_at, tokens))
        return sent_at

    def completed(self, sent_at: float) -> None:
        """A successful response to the request sent at `sent_at`: the window learns its latency."""
        if self.window is not None:
            self.window.completed(sent_at)
            self._wake_slot_waiters()

    def heard(self) -> None:
        """A response of any kind came back: the window stops growing with the silence."""
        if self.window is not None:
            self.window.heard()

    @property
    def limits(self) -> ServerLimits:
        """The budgets per minute paced for at full share: configured, else learned, else None (unlimited)."""
        return ServerLimits(self._base["requests"], self._base["tokens"])

    @property
    def requests_per_minute(self) -> float | None:
        """The request rate in force now (configured or learned, times `share`), None if unlimited."""
        bucket = self._buckets.get("requests")
        return bucket.per_minute if bucket else None

    @property
    def tokens_per_minute(self) -> float | None:
        """The token rate in force now (configured or learned, times `share`), None if unlimited."""
        bucket = self._buckets.get("tokens")
        return bucket.per_minute if bucket else None

    @property
    def counts_tokens(self) -> bool:
        """True when a token budget is in force, so callers must estimate each request's tokens."""
        return "tokens" in self._buckets

    @property
    def needs_tokens(self) -> bool:
        """True when sends must say their tokens: a token budget is in force, or no response has said yet."""
        return self.counts_tokens or not self._heard

    def delay_s(self, tokens: int = 0) -> float:
        """Seconds until a request of `tokens` may go: the cool-down, then room in both budgets."""
        now = self._clock()
        waits = [self.cool_down_until - now]
        if bucket := self._buckets.get("requests"):
            waits.append(bucket.wait_s(1, now))
        if bucket := self._buckets.get("tokens"):
            waits.append(bucket.wait_s(tokens, now))
        return max(0.0, *waits)

    async def acquire(self, tokens: int | Callable[[], int] = 0, *, retry: bool = False) -> int:
        """Wait for a concurrency slot, the end of any cool-down and room in the budgets; returns a permit number.

        `tokens` (or what it returns, asked once the slot is taken: an estimate improves while requests wait)
        is charged to the token budget, if one is in force. A `retry` waits ahead of first tries: behind a
        job's whole fan-out, each retry of an unlucky request would wait the queue again, and the job for it.
        Every acquire must be followed by one `release()`.
        """
        await self._take_slot(first=retry)
        try:
            async with self._pacing:  # one waiter at a time, in arrival order: no thundering herd
                while (delay := self.delay_s(amount := self._tokens(tokens))) > 0:
                    await self._sleep(delay)
                self._debit(amount)
        except BaseException:
            self.release()
            raise
        self._issued += 1
        return self._issued

    def _tokens(self, tokens: int | Callable[[], int]) -> int:
        if not self.counts_tokens:
            return 0
        return tokens() if callable(tokens) else tokens

    def release(self) -> None:
        """Give back the concurrency slot taken by `acquire`."""
        self._in_use -= 1
        self._wake_slot_waiters()

    def on_success(self) -> None:
        """Additive increase: RECOVERY_PER_ROUND more of the share per round trip (a round trip being as many
        successes as requests allowed in flight), up to all of it.

        One request per round trip out of `max_concurrency` would take a halved share of a 256 bound some 128
        round trips to recover; a fixed fraction recovers in a few, whatever the bound.
        """
        in_flight = self.max_concurrency * self.share
        if self.window is not None:
            in_flight = min(in_flight, self.window.size(self.requests_per_minute, self.tokens_per_minute))
        self._set_share(self.share + RECOVERY_PER_ROUND / max(1.0, in_flight))

    def on_rate_limited(self, retry_after_s: float | None, permit: int | None = None) -> None:
        """A 429: pause every request for `retry_after_s` and halve the share (once per round in flight)."""
        self.rate_limited += 1
        wait = DEFAULT_COOL_DOWN_S if retry_after_s is None else _bounded(retry_after_s)
        self.cool_down_until = max(self.cool_down_until, self._clock() + wait)
        if permit is None or permit > self._cut_after:
            self._cut_after = self._issued
            if self.window is not None:
                self.window.overloaded()
            self._set_share(self.share / 2)

    def observe(self, headers: Mapping[str, str], sent_at: float | None = None) -> None:
        """Learn the budgets a server announces, for those not configured, from a response to a request sent at
        `sent_at`: a budget learned for the first time starts at what the server says remains of it."""
        announced = server_limits(headers)
        self._heard = True
        self.heard()
        for kind, per_minute in (
            ("requests", announced.requests_per_minute),
            ("tokens", announced.tokens_per_minute),
        ):
            configured = getattr(self.configured, f"{kind}_per_minute")
            if configured is None and per_minute is not None and per_minute != self._base[kind]:
                self._base[kind] = per_minute
                if bucket := self._buckets.get(kind):
                    bucket.capacity = max(1.0, per_minute * self.burst_s / 60)
                    self._set_share(self.share)
                else:
                    level = self._remaining(kind, per_minute, headers, sent_at)
                    self._buckets[kind] = self._new_bucket(per_minute * self.share, full=False, level=level)
                # 429s of requests sent before we knew the limit are no reason to go below it
                self._cut_after = self._issued

    def _new_bucket(self, per_minute: float, *, full: bool, level: float | None = None) -> TokenBucket:
        capacity = max(1.0, per_minute * self.burst_s / 60)
        return TokenBucket(per_minute, capacity, self._clock(), full=full, level=level)

    def _remaining(
        self, kind: str, per_minute: int, headers: Mapping[str, str], sent_at: float | None
    ) -> float | None:
        """What is left now of a budget the server just announced, or None (start empty) if it does not say.

        The header counts the budget as the request sent at `sent_at` found it: the server's bucket is replayed
        from there (refilled at the rate, up to the capacity its `x-ratelimit-reset-*` implies, and at most
        our own burst of it) through the requests sent since, which the header cannot have counted.
        """
        lower = _lower(headers)
        remaining = _number(lower.get(f"x-ratelimit-remaining-{kind}"))
        if remaining is None or sent_at is None:
            return None
        reset_s = parse_duration(lower.get(f"x-ratelimit-reset-{kind}", "")) or 0.0
        per_s = per_minute / 60
        capacity = min(max(remaining, 0.0) + reset_s * per_s, per_s * self.burst_s)
        server = TokenBucket(per_minute, capacity, sent_at, level=min(max(remaining, 0.0), capacity))
        for at, tokens in self._sends:
            if at > sent_at:
                server.take(1 if kind == "requests" else tokens, at)
        server.refill(self._clock())
        return max(0.0, server.level)

    def _set_share(self, share: float) -> None:
        self.share = min(1.0, max(1 / self.max_concurrency, share))
        now = self._clock()
        for kind, bucket in self._buckets.items():
            base = self._base[kind]
            if base is not None:
                bucket.set_rate(base * self.share, now)
        self._wake_slot_waiters()

    def _debit(self, tokens: int) -> None:
        now = self._clock()
        if bucket := self._buckets.get("requests"):
            bucket.take(1, now)
        if bucket := self._buckets.get("tokens"):
            bucket.take(tokens, now)

    async def _take_slot(self, *, first: bool = False) -> None:
        if self._in_use < self.concurrency and not self._slot_waiters:
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._slot_waiters.appendleft(waiter)
        else:
            self._slot_waiters.append(waiter)
        self._wake_when_the_window_grows()
        try:
            await waiter  # the slot is handed over by `_wake_slot_waiters`, in arrival order
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled
            elif waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            raise

    def _wake_slot_waiters(self) -> None:
        while self._slot_waiters and self._in_use < self.concurrency:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._in_use += 1
                waiter.set_result(None)

    def _wake_when_the_window_grows(self) -> None:
        """While the window grows with silence and requests wait for a slot, hand them slots as it grows."""
        loop = asyncio.get_running_loop()
        if self._growth_timer is not None and self._growth_timer[0] is loop:  # one timer per event loop
            return
        if not self._slot_waiters or self.window is None or (delay := self.window.grows_in()) is None:
            return
        self._growth_timer = (loop, loop.call_later(max(delay, MIN_GROWTH_WAKE_S), self._grown))

    def _grown(self) -> None:
        self._growth_timer = None
        self._wake_slot_waiters()
        self._wake_when_the_window_grows()
