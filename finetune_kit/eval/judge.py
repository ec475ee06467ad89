"""The LLM judge: a fixed, versioned rubric at temperature 0 with a seed; an unparseable verdict is asked once
more, then counted as unjudged (never as a wrong answer)."""

import re
from dataclasses import dataclass
from typing import Literal

from finetune_kit.config import Settings
from finetune_kit.errors import RequestRejectedError
from finetune_kit.llm.client import ChatRequest, LLMClient
from finetune_kit.prompts import PromptTemplate, load_prompt

Verdict = Literal["correct", "partly", "incorrect", "unjudged"]
SCORES: dict[str, float] = {"correct": 1.0, "partly": 0.5, "incorrect": 0.0}
JUDGE_ATTEMPTS = 2  # the first ask and one retry with another seed (a different cache key)
JUDGE_MAX_TOKENS = 120
MAX_ANSWER_CHARS = 6_000  # what the judge reads of one answer

_VERDICT = re.compile(r"verdict\W{0,3}\s*\**\s*(correct|partly|partially correct|incorrect)\b", re.I)
_REASON = re.compile(r"reason\W{0,3}\s*(.+)", re.I)


@dataclass(frozen=True)
class Judgement:
    """What the judge said about one answer, and what asking it cost."""

    verdict: Verdict
    reason: str
    attempts: int
    cost_usd: float = 0.0
    calls_paid: int = 0

    @property
    def score(self) -> float | None:
        """1 correct, ½ partly, 0 incorrect; None when unjudged (left out of the mean, never a 0)."""
        return SCORES.get(self.verdict)


def load_rubric(settings: Settings) -> PromptTemplate:
    """The judge's rubric, from settings.prompts_dir or the bundled prompts/eval_judge.txt."""
    return load_prompt("eval_judge", settings.prompts_dir)


def judge_request(
    settings: Settings, rubric: PromptTemplate, question: str, reference: str, answer: str, attempt: int
) -> ChatRequest:
    """The request that grades one answer; temperature 0, and the seed is the attempt number."""
    prompt = rubric.render(
        product=settings.product, question=question, reference=reference, answer=answer[:MAX_ANSWER_CHARS]
    )
    return ChatRequest(
        stage="eval-judge",
        messages=(("user", prompt),),
        temperature=0.0,
        max_tokens=JUDGE_MAX_TOKENS,
        template_version=rubric.version,
        attempt=attempt,
    )


def parse_verdict(text: str) -> tuple[Verdict, str] | None:
    """(verdict, reason) from the judge's reply, or None when the reply holds no verdict."""
    match = _VERDICT.search(text)
    if match is None:
        return None
    word = match.group(1).lower()
    verdict: Verdict = "partly" if word.startswith("partly") or word.startswith("partially") else word  # type: ignore[assignment]
    reason = _REASON.search(text[match.end() :])
    return verdict, (reason.group(1).strip() if reason else "")[:300]


async def judge(
    client: LLMClient, settings: Settings, rubric: PromptTemplate, question: str, reference: str, answer: str
) -> Judgement:
    """Grade `answer` against `reference`; unparseable twice (or refused by the endpoint) is unjudged."""
    cost, paid, last = 0.0, 0, ""
    for attempt in range(JUDGE_ATTEMPTS):
        request = judge_request(settings, rubric, question, reference, answer, attempt)
        try:
            result = await client.chat(request)
        except RequestRejectedError as exc:
            return Judgement(
                "unjudged", f"the judge's endpoint rejected the request: {exc}", attempt + 1, cost, paid
            )
        cost, paid, last = cost + result.cost_usd, paid + (not result.cached), result.content
        if (parsed := parse_verdict(result.content)) is not None:
            return Judgement(parsed[0], parsed[1], attempt + 1, cost, paid)
    return Judgement(
        "unjudged", f"no verdict in the judge's reply: {last.strip()[:120]!r}", JUDGE_ATTEMPTS, cost, paid
    )
