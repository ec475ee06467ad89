"""Faithfulness of a retrieval arm's answer: the share of its claims that the chunks it was given support.

A judge call splits the answer into claims and marks each supported or not, with a fixed, versioned rubric
(prompts/eval_faithfulness.txt) at temperature 0 and a seed; a reply in which no claim line parses is asked once
more with another seed, then the answer is unjudged: left out of the figure, never a 0.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.prompts import PromptTemplate, load_prompt

ATTEMPTS = 2  # the first ask and one retry with another seed (a different cache key)
MAX_TOKENS = 600  # room for a dozen claims, one a line
MAX_ANSWER_CHARS = 6_000
MAX_SOURCE_CHARS = 4_000  # of each source, as the judge reads it

_CLAIM = re.compile(
    r"^\W*claim\s*\d*\W{0,3}\s*(?P<text>.+?)\s*[|:—–-]\s*\**(?P<mark>unsupported|not supported|supported)\**\W*$",
    re.I,
)
_NO_CLAIMS = re.compile(r"^\W*no claims\W*$", re.I | re.M)


@dataclass(frozen=True)
class ClaimCheck:
    """What the judge said of one answer's claims, and what asking it cost."""

    claims: list[tuple[str, bool]] = field(default_factory=list)  # (claim, supported), in the answer's order
    unjudged: bool = False
    reason: str = ""  # why it is unjudged
    attempts: int = 0
    cost_usd: float = 0.0
    calls_paid: int = 0

    @property
    def score(self) -> float | None:
        """Supported claims over claims; None when unjudged or the answer made no claim."""
        if self.unjudged or not self.claims:
            return None
        return sum(supported for _, supported in self.claims) / len(self.claims)


def load_rubric(settings: Settings) -> PromptTemplate:
    """The claim checker's rubric, from settings.prompts_dir or the bundled prompts/eval_faithfulness.txt."""
    return load_prompt("eval_faithfulness", settings.prompts_dir)


def claims_request(
    settings: Settings, rubric: PromptTemplate, sources: Sequence[str], answer: str, attempt: int
) -> ChatRequest:
    """The request that checks one answer's claims against its numbered sources; the seed is the attempt."""
    numbered = "\n\n".join(f"[{n}] {text[:MAX_SOURCE_CHARS]}" for n, text in enumerate(sources, 1))
    prompt = rubric.render(product=settings.product, sources=numbered, answer=answer[:MAX_ANSWER_CHARS])
    return ChatRequest(
        stage="eval-faithfulness",
        messages=(("user", prompt),),
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        template_version=rubric.version,
        attempt=attempt,
    )


def parse_claims(text: str) -> list[tuple[str, bool]] | None:
    """The (claim, supported) lines of the judge's reply; [] for "NO CLAIMS"; None when nothing parses."""
    claims = []
    for line in text.splitlines():
        if match := _CLAIM.match(line.strip()):
            claims.append((match["text"].strip(), match["mark"].lower() == "supported"))
    if claims:
        return claims
    return [] if _NO_CLAIMS.search(text) else None


async def check_claims(
    client: LLMClient, settings: Settings, rubric: PromptTemplate, sources: Sequence[str], answer: str
) -> ClaimCheck:
    """The judge's claim-by-claim check of `answer`; unparseable twice (or refused by the endpoint) is unjudged."""
    cost, paid, last = 0.0, 0, ""
    for attempt in range(ATTEMPTS):
        try:
            result = await client.chat(claims_request(settings, rubric, sources, answer, attempt))
        except RequestRejectedError as exc:
            reason = f"the judge's endpoint rejected the request: {exc}"
            return ClaimCheck(
                unjudged=True, reason=reason, attempts=attempt + 1, cost_usd=cost, calls_paid=paid
            )
        cost, paid, last = cost + result.cost_usd, paid + (not result.cached), result.content
        if (claims := parse_claims(result.content)) is not None:
            return ClaimCheck(claims, attempts=attempt + 1, cost_usd=cost, calls_paid=paid)
    reason = f"no claim lines in the judge's reply: {last.strip()[:120]!r}"
    return ClaimCheck(unjudged=True, reason=reason, attempts=ATTEMPTS, cost_usd=cost, calls_paid=paid)
