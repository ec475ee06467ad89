"""How many requests may be in flight: Little's law over the allowed rate and the latency the server shows.

A constant is right for one server only: 8 in flight is 5 % of what a 1.5 s, 6,000 RPM account allows, and far
more than a CPU serving a small model can take. In flight = rate × latency, so the window is the allowed rate
(announced in `x-ratelimit-limit-*` or configured; the token budget divided by the tokens a request costs)
times the observed latency (an EWMA), with headroom so that jitter never leaves the budget unspent. The rate
limiter's buckets still pace the sends, so a window a little too large costs nothing but a wait for a bucket.

Before both a rate and a latency are known the window starts small and doubles once per window of completions
(slow start), until the latency says stop (it has doubled since the fastest response: the server is queueing)
or `max_size`; it jumps straight to rate × latency as soon as the first response gives both. A rate known
before any latency (configured) needs no slow start: the buckets' pacing alone keeps the first round to rate ×
latency, which is all that can be in flight when the first response comes back.

The first round is sent blind, so its size is a bet: 16 (TCP starts at 10 segments, RFC 6928) is a fraction
of a second of any paid API tier's rate, and a server that allows less answers its 429s at once, with the
limit in their headers. Silence is news too: a server that has not answered anything after t seconds has a
latency of at least t, and Little's law says a latency that long needs that much more in flight, so while
nothing at all has come back the window doubles every SILENT_DOUBLING_S. A refusal (a 429, a 500) ends the
silence at once, within a round trip of its cause. Without it, at 1.5 s and 100 requests a second, 16
requests in the first 1.5 s cost a 300-request job a fifth of its time.
"""

import math
import time
from collections.abc import Callable

Clock = Callable[[], float]

DEFAULT_MAX_SIZE = 256  # an upper bound a user may lower; the window itself is what the server allows
START_SIZE = 16
HEADROOM = 1.2
EWMA_WEIGHT = 0.2  # of the newest sample
QUEUEING_FACTOR = 2.0  # a latency this many times the fastest seen means the server queues: stop growing
SILENT_DOUBLING_S = 0.5  # while no response at all has come back, the window doubles this often


class Window:
    """The number of requests allowed in flight, from rate × latency × headroom, or slow start before that."""

    def __init__(
        self,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        start: int = START_SIZE,
        headroom: float = HEADROOM,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_size = max(1, max_size)
        self.headroom = headroom
        self.clock = clock
        self.slow_start = min(max(1, start), self.max_size)
        self.latency_s: float | None = None  # EWMA of successful responses' latency
        self.fastest_s: float | None = None
        self.tokens_per_request: float | None = None  # EWMA of the budget tokens a request costs
        self._completed = 0  # since the slow-start window last grew
        self._first_sent_at: float | None = None
        self._heard = False  # any response, success or refusal, ends the silent growth

    def size(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None) -> int:
        """Requests allowed in flight now under these rates (None: not known)."""
        target = self.target(requests_per_minute, tokens_per_minute)
        if target is None and self.latency_s is None and (requests_per_minute or tokens_per_minute):
            return self.max_size  # a known rate paces the first round on its own
        if target is None:
            return min(self.max_size, max(self.slow_start, self._silent_size()))
        return min(self.max_size, max(1, target))

    def _silent_size(self) -> int:
        """The first round grown by the silence since it went out: START × 2^(silence / SILENT_DOUBLING_S)."""
        if self._heard or self._first_sent_at is None:
            return 0
        silence = max(0.0, self.clock() - self._first_sent_at)
        return math.floor(self.slow_start * 2 ** (silence / SILENT_DOUBLING_S))

    def grows_in(self) -> float | None:
        """Seconds until the silent growth allows one more request in flight, None when it is over."""
        if self._heard or self._first_sent_at is None or self._silent_size() >= self.max_size:
            return None
        now = max(self.slow_start, self._silent_size())
        at = self._first_sent_at + SILENT_DOUBLING_S * math.log2((now + 1) / self.slow_start)
        return max(0.0, at - self.clock())

    def heard(self) -> None:
        """Some response came back (a success, a refusal or an error): the silence is over."""
        self._heard = True

    def target(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> int | None:
        """rate × latency × headroom, or None while the rate or the latency is unknown."""
        if self.latency_s is None:
            return None
        rates = [requests_per_minute / 60] if requests_per_minute else []
        if tokens_per_minute and self.tokens_per_request:
            rates.append(tokens_per_minute / 60 / self.tokens_per_request)
        if not rates:
            return None
        return math.ceil(min(rates) * self.latency_s * self.headroom)

    def sent(self, tokens: int = 0) -> float:
        """Note a request about to go out (its budget tokens, 0 if none are counted); returns its start time."""
        if tokens > 0:
            self.tokens_per_request = _ewma(self.tokens_per_request, float(tokens))
        now = self.clock()
        if self._first_sent_at is None:
            self._first_sent_at = now
        return now

    def completed(self, sent_at: float) -> None:
        """A successful response to the request sent at `sent_at`: learn its latency, grow the slow start."""
        self._heard = True
        latency = max(0.0, self.clock() - sent_at)
        self.latency_s = _ewma(self.latency_s, latency)
        self.fastest_s = latency if self.fastest_s is None else min(self.fastest_s, latency)
        self._completed += 1
        if self._completed >= self.slow_start and not self.queueing:
            self.slow_start = min(self.max_size, self.slow_start * 2)
            self._completed = 0

    @property
    def queueing(self) -> bool:
        """True when the latency has grown well past the fastest response: more in flight would only wait."""
        if self.latency_s is None or self.fastest_s is None:
            return False
        return self.latency_s > QUEUEING_FACTOR * max(self.fastest_s, 1e-3)

    def overloaded(self) -> None:
        """A 429 that spent the budget: halve the slow start (the rate-based target follows the limiter's share)."""
        self._heard = True
        self.slow_start = max(1, self.slow_start // 2)
        self._completed = 0


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample
