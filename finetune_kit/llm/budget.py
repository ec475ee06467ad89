"""Spending limits: every request reserves its worst-case price before it is sent, so a run never overspends."""

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from finetune_kit.config import ModelPrice
from finetune_kit.errors import BudgetExceededError
from finetune_kit.tokens import count_tokens

if TYPE_CHECKING:  # the client imports this module
    from finetune_kit.llm.client import ChatRequest

MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message, as OpenAI's cookbook counts them


@lru_cache(maxsize=4096)  # asked for the budget, the token budget and each retry of the same request
def prompt_tokens(request: "ChatRequest") -> int:
    """Offline estimate of a request's prompt tokens."""
    return 3 + sum(MESSAGE_OVERHEAD_TOKENS + count_tokens(content) for _, content in request.messages)


def worst_case_cost(request: "ChatRequest", price: ModelPrice, price_factor: float = 1.0) -> float:
    """The most `request` can cost: its prompt plus max_tokens of completion."""
    return price_factor * (prompt_tokens(request) * price.input + request.max_tokens * price.output) / 1e6


@dataclass
class Budget:
    """A cap on what one run may spend; reservations cover requests in flight."""

    limit_usd: float | None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0

    def reserve(self, request: "ChatRequest", price: ModelPrice) -> float:
        """Reserve the worst case of `request`, or raise if that would cross the limit (no limit: nothing)."""
        if self.limit_usd is None:
            return 0.0  # and no prompt to count: a cost estimate per request is CPU a fast server waits on
        cost = worst_case_cost(request, price)
        if self.limit_usd is not None and self.spent_usd + self.reserved_usd + cost > self.limit_usd:
            raise BudgetExceededError(
                f"stopped at the budget: ${self.spent_usd:.4f} of --max-cost ${self.limit_usd:.2f} spent, and the"
                f" next call could cost ${cost:.4f} — re-run with a higher --max-cost to continue (finished work is kept)"
            )
        self.reserved_usd += cost
        return cost

    def settle(self, reserved: float, actual: float) -> None:
        """Replace a reservation by what the call really cost (zero if it failed)."""
        self.reserved_usd -= reserved
        self.spent_usd += actual
