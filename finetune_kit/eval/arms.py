"""The arms of an eval (base, ft, rag, ft+rag) and how each answers: the bot's prompt, through the cached client."""

import asyncio
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune_kit.config import LOCAL_MODEL_ALIAS, Settings
from finetune_kit.errors import ConfigError, RequestRejectedError
from finetune_kit.eval.faithfulness import ClaimCheck
from finetune_kit.eval.questions import EvalQuestion
from finetune_kit.llm.client import ChatRequest, ChatResult, LLMClient, request_hash
from finetune_kit.llm.endpoint import is_local_model
from finetune_kit.prompts import default_system_prompt
from finetune_kit.slack.answerer import Turn, fit_to_context, prompt_budget
from finetune_kit.store import Store

log = logging.getLogger(__name__)

ARM_NAMES = ("base", "ft", "rag", "ft+rag")
ANSWER_TEMPLATE = (
    "eval-answer-1"  # the closed-book request is the bot's: its system prompt, settings and turns
)
NO_RETRIEVAL = "no retrieval in this ftkit (finetune_kit.retrieval.answer is missing)"


@dataclass(frozen=True)
class Arm:
    """One way of answering: a model, with or without retrieval."""

    name: str
    model: str
    retrieval: bool


@dataclass(frozen=True)
class ArmPlan:
    """The arms an eval runs, and the ones it skips with why."""

    arms: list[Arm]
    skipped: dict[str, str]


def parse_arm_names(text: str | None) -> list[str] | None:
    """`base,ft+rag` as arm names; None (every arm that exists) when not given."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if bad := [name for name in names if name not in ARM_NAMES]:
        raise ConfigError(f"--arms: unknown arm {bad[0]!r} — choose from {','.join(ARM_NAMES)}")
    if not names:
        raise ConfigError(f"--arms is empty — choose from {','.join(ARM_NAMES)}")
    return list(dict.fromkeys(names))


def plan_arms(
    requested: list[str] | None,
    base_model: str,
    ft_model: str | None,
    no_retrieval: str | None,
) -> ArmPlan:
    """The arms to run: those requested (default all) that exist; the others skipped with a note."""
    arms: list[Arm] = []
    skipped: dict[str, str] = {}
    for name in requested or list(ARM_NAMES):
        model = ft_model if name.startswith("ft") else base_model
        if model is None:
            skipped[name] = "no fine-tuned model: `ftkit train --watch` makes one, or pass --ft-model"
        elif name.endswith("rag") and no_retrieval is not None:
            skipped[name] = f"no retrieval: {no_retrieval}"
        else:
            arms.append(Arm(name, model, retrieval=name.endswith("rag")))
    return ArmPlan(arms, skipped)


def retrieval_missing(store: Store, settings: Settings) -> str | None:
    """Why the retrieval arms cannot run here (no retrieval code, no usable index), or None when they can."""
    if importlib.util.find_spec("finetune_kit.retrieval.answer") is None:
        return NO_RETRIEVAL
    from finetune_kit.eval.grounded import index_missing

    return index_missing(store, settings)


def arm_settings(settings: Settings, model: str) -> Settings:
    """Settings that select the endpoint answering as `model`, as `open_model_endpoint` picks it."""
    local = model == LOCAL_MODEL_ALIAS or is_local_model(settings, model)
    return settings.model_copy(update={"model": model, "provider": "local" if local else settings.provider})


def closed_book_request(settings: Settings, question: EvalQuestion, embedded: bool) -> ChatRequest:
    """The request the bot (and `ftkit ask`) would send for this question: its system prompt, turns and limits."""
    system = settings.slack.system_prompt or default_system_prompt(settings)
    turns = [*question.history, Turn("user", question.question)]
    messages = fit_to_context(system, turns, prompt_budget(settings, embedded))
    return ChatRequest(
        stage="eval-answer",
        messages=tuple((m["role"], m["content"]) for m in messages),
        temperature=settings.slack.temperature,
        max_tokens=settings.slack.max_answer_tokens,
        template_version=ANSWER_TEMPLATE,
    )


@dataclass
class ArmAnswer:
    """One arm's answer to one question, with what it cost and how long it took when it was paid for."""

    question_id: str
    arm: str
    model: str
    answer: str
    cost_usd: float
    cached: bool
    latency_ms: float | None
    error: str | None = None
    refused: bool | None = None  # None: told from the answer's words (closed-book arms)
    retrieved: list[dict[str, object]] = field(default_factory=list)  # the top 10: rank, path, url, score
    given: list[dict[str, object]] = field(default_factory=list)  # the numbered sources the model saw
    sources: list[dict[str, object]] = field(default_factory=list)  # what the answer cited, as shown
    cited: list[int] = field(default_factory=list)  # the citation numbers in the model's own text
    context: list[str] = field(default_factory=list)  # the chunk texts the model saw (not written out)
    refused_before_model: bool = False  # the retrieval gate said "I don't know" without a call
    support: "ClaimCheck | None" = None  # the judge's check of its claims against `context` (retrieval arms)

    @property
    def grounded(self) -> bool:
        """True for an answer of a retrieval arm."""
        return bool(self.retrieved or self.given or self.refused_before_model)


class LatencyLog:
    """The latency of each paid answer, by request hash, so a cached re-run still reports the real latency.

    One JSON line per paid call, appended and flushed at once: a killed run loses at most the line it was writing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._made = False  # the folder exists (made once, not once an answer)
        self.known: dict[str, float] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.known[str(record["request"])] = float(record["ms"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    def record(self, key: str, ms: float) -> None:
        """Remember the latency of the paid call `key` (to a tenth of a millisecond, as stored)."""
        self.known[key] = ms = round(ms, 1)
        if not self._made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = True
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"request": key, "ms": ms}) + "\n")


async def ask_arm(
    client: LLMClient,
    request: ChatRequest,
    latencies: LatencyLog,
    slots: asyncio.Semaphore,
) -> tuple[ChatResult | None, float | None, str | None]:
    """(result, latency in ms, error) of one answer; the clock runs only once a slot is free."""
    key = request_hash(client.endpoint, request)
    async with slots:
        started = time.monotonic()
        try:
            result = await client.chat(request)
        except RequestRejectedError as exc:
            return None, None, f"request rejected by the endpoint: {exc}"
        elapsed_ms = (time.monotonic() - started) * 1000
    if not result.cached:
        latencies.record(key, elapsed_ms)
    return result, latencies.known.get(key), None
