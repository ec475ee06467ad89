"""Pipeline stages: each can run alone, be killed at any point, and be re-run without repeating work."""

import asyncio
from collections.abc import Coroutine
from typing import Any


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
