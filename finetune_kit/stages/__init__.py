"""Pipeline stages: each can run alone, be killed at any point, and be re-run without repeating work."""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
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
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failure = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
    if failure is None:
        return
    if not isinstance(failure, BudgetExceededError):
        for task in pending:
            task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    raise failure
