"""Pipeline stages: each can run alone, be killed at any point, and be re-run without repeating work."""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from finetune_kit.llm.client import ChatRequest

# Fetches a round of requests into the cache before a stage reads them (the Batch API); returns, for each request
# that could not be answered, its request hash and why.
Prefill = Callable[[list[ChatRequest]], Awaitable[dict[str, str]]]


async def gather_all(jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run all jobs; on the first failure cancel the rest and re-raise it (finished items are already saved)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
