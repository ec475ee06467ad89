"""Pipeline stages: each can run alone, be killed at any point, and be re-run without repeating work."""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

from finetune_kit.errors import BudgetExceededError
from finetune_kit.llm.client import ChatRequest

# Fetches a round of requests into the cache before a stage reads them (the Batch API); returns, for each request
# that could not be answered, its request hash and why.
Prefill = Callable[[list[ChatRequest]], Awaitable[dict[str, str]]]


async def gather_all(jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run all jobs; on the first failure stop the rest and re-raise it (finished items are already saved).

    A budget stop lets calls already in flight finish (they are paid for); any other failure cancels them.
    """
    tasks = [asyncio.ensure_future(job) for job in jobs]
    if not tasks:
        return
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:  # the stage around this one failed: its jobs must not outlive it
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    failure = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
    if failure is None:
        return
    if not isinstance(failure, BudgetExceededError):
        for task in pending:
            task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    raise failure


class Lookahead:
    """Lets at most `size()` holders in at once, the size read again whenever one leaves (it follows the window).

    Stages that overlap need it: the client serves waiting requests in arrival order, so a stage that queued every
    chunk's request at once would put the next stage's requests behind all of them.
    """

    def __init__(self, size: Callable[[], int]) -> None:
        self.size = size
        self.inside = 0
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.inside < max(1, self.size()))
            self.inside += 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._changed:
            self.inside -= 1
            self._changed.notify_all()
