"""The library behind `ftkit eval`: pick questions and arms, answer, judge, score, write the report."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError, RequestRejectedError
from finetune_kit.eval import faithfulness, unanswerable
from finetune_kit.eval.arms import (
    Arm,
    ArmAnswer,
    ArmPlan,
    LatencyLog,
    arm_settings,
    ask_arm,
    closed_book_request,
    plan_arms,
    retrieval_missing,
)
from finetune_kit.eval.judge import Judgement, judge, judge_request, load_rubric
from finetune_kit.eval.questions import EvalQuestion, held_out_questions, load_questions_file
from finetune_kit.eval.summary import EvalSummary, summarize
from finetune_kit.llm.budget import Budget
from finetune_kit.llm.client import (
    ChatRequest,
    ChatResult,
    Endpoint,
    LLMClient,
    cached_result,
    request_hash,
)
from finetune_kit.llm.endpoint import open_endpoint, open_model_endpoint
from finetune_kit.pipeline import DRY, recorded_run
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.slack.answerer import registered_model
from finetune_kit.stages import gather_all
from finetune_kit.stages.estimate import StageEstimate, estimate_stage, planning_endpoint
from finetune_kit.store import Store

if TYPE_CHECKING:
    from finetune_kit.eval.grounded import GroundedArm

log = logging.getLogger(__name__)
REFUSED = "refused (the docs were not found to cover it): no call to the judge"
TYPICAL_ANSWER_WORDS = 120  # a dry run sizes the judging of answers not yet written with this many words
UNWRITTEN_UNANSWERABLE = "The unanswerable questions are not written yet: their call is counted, answering and judging them is not."


@dataclass(frozen=True)
class EvalOptions:
    """What `ftkit eval` was asked to do."""

    arms: list[str] | None = None  # None: every arm that exists
    base_model: str | None = None  # None: the model fine-tuning starts from
    ft_model: str | None = None  # None: the newest registered fine-tuned model
    judge_model: str | None = None  # None: the generation model
    judge: bool = True  # False: judge-free scores only (no judge calls)
    questions_file: Path | None = None
    held_out: bool | None = None  # None: the held-out questions unless a file is given
    run_name: str | None = None
    dry_run: bool = False
    unanswerable: bool | None = None  # None: generated unanswerable questions join the held-out ones


@dataclass
class EvalOutcome:
    """A finished eval (its summary and run folder), or a dry run's estimates."""

    summary: EvalSummary | None = None
    run_dir: Path | None = None
    estimates: list[StageEstimate] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a dry run's figures assume


def run_eval(settings: Settings, options: EvalOptions, progress: Progress | None = None) -> EvalOutcome:
    """`ftkit eval`: every planned arm answers every question, the judge grades, the report is written."""
    progress = progress or NoProgress()
    with recorded_run(settings, "eval" + DRY * options.dry_run) as (store, run_id):
        questions = collect_questions(store, settings, options)
        plan = _plan(store, settings, options)
        unchecked = unanswerable.unchecked_because(store) if _wants_unanswerable(options) else None
        if options.dry_run:
            notes, extra = [], []
            if _wants_unanswerable(options) and unchecked is None:
                found = unanswerable.cached(store, settings, planning_endpoint(settings), questions)
                questions += found[0] if found else []
                extra = [] if found else [unanswerable.request(store, settings)]
                notes = [] if found else [UNWRITTEN_UNANSWERABLE]
            estimates = estimate_eval(store, settings, options, plan, questions, extra)
            notes = _dry_notes(estimates) + notes
            return EvalOutcome(estimates=estimates, skipped=plan.skipped, notes=notes)
        evaluation = _Evaluation(
            store, settings, options, run_id, progress, Budget(limit_usd=settings.max_cost_usd)
        )
        if unchecked is not None:
            evaluation.notes.append(f"no generated unanswerable questions: {unchecked}")
        elif _wants_unanswerable(options):
            questions += asyncio.run(evaluation.unanswerable(questions))
        answers, judgements = asyncio.run(evaluation.run(plan.arms, questions))
        run_dir = settings.workspace / "eval" / (options.run_name or _run_name())
        summary = summarize(run_dir.name, questions, plan, answers, judgements, evaluation.context(plan))
        summary.calls_paid, summary.cache_hits = evaluation.calls_paid, evaluation.cache_hits
        summary.spent_usd = evaluation.budget.spent_usd
        from finetune_kit.eval.report import write_report

        write_report(run_dir, summary, questions, answers, judgements)
        return EvalOutcome(summary, run_dir, skipped=plan.skipped)


def _dry_notes(estimates: list[StageEstimate]) -> list[str]:
    if not any(e.extrapolated for e in estimates):
        return []
    return [
        f"The judge's calls for answers not yet written are sized at {TYPICAL_ANSWER_WORDS} words an answer;"
        " a reply without a verdict costs one more call."
    ]


def _wants_unanswerable(options: EvalOptions) -> bool:
    """--unanswerable, or by default whenever the held-out questions are asked."""
    if options.unanswerable is not None:
        return options.unanswerable
    return options.held_out if options.held_out is not None else options.questions_file is None


def _run_name() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def collect_questions(store: Store, settings: Settings, options: EvalOptions) -> list[EvalQuestion]:
    """The file's questions (checked whole before anything runs) and/or the workspace's held-out ones."""
    questions = load_questions_file(options.questions_file) if options.questions_file else []
    if options.held_out if options.held_out is not None else options.questions_file is None:
        questions = held_out_questions(store, settings) + questions
    if not questions:
        raise ConfigError(
            f"no held-out questions in {settings.workspace} under the current settings — run `ftkit build-dataset`"
            " first with the same --product, --provider and --model (the validation split is what eval asks),"
            " or pass --questions FILE.jsonl"
        )
    return questions


def _plan(store: Store, settings: Settings, options: EvalOptions) -> ArmPlan:
    base = options.base_model or settings.fine_tune_base_model
    ft = options.ft_model or registered_model(settings)
    return plan_arms(options.arms, base, ft, retrieval_missing(store, settings))


def _judge_settings(settings: Settings, options: EvalOptions) -> Settings:
    """Settings selecting the judge: --judge-model at its endpoint, else the generation endpoint and model."""
    return arm_settings(settings, options.judge_model) if options.judge_model else settings


def claims_checked(answer: ArmAnswer) -> bool:
    """True if the judge checks the answer's claims against its sources: a retrieval arm's, not a refusal."""
    return bool(answer.context) and not answer.refused and not answer.error and bool(answer.answer.strip())


def gradable(question: EvalQuestion) -> bool:
    """True if the judge can grade answers to `question`: answerable, with a reference answer."""
    return question.answerable and bool(question.reference)


class _Evaluation:
    """One eval run's calls: the arms' answers, then the judge's verdicts, all through the cached client."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        options: EvalOptions,
        run_id: int,
        progress: Progress,
        budget: Budget,
    ) -> None:
        self.store, self.settings, self.options, self.run_id = store, settings, options, run_id
        self.progress, self.budget = progress, budget
        self.latencies = LatencyLog(settings.workspace / "eval" / "latency.jsonl")
        self.calls_paid = self.cache_hits = 0
        self.judge_model = ""
        self.notes: list[str] = []  # for the report: what the run could not do, or how it chose
        self._grounded: GroundedArm | None = None

    async def run(
        self, arms: list[Arm], questions: list[EvalQuestion]
    ) -> tuple[list[ArmAnswer], dict[tuple[str, str], Judgement]]:
        """Every arm's answers, then the judgement of each gradable one."""
        answers: list[ArmAnswer] = []
        for arm in arms:
            answers += await self._answer(arm, questions)
        return answers, (await self._judge(questions, answers) if self.options.judge else {})

    def context(self, plan: ArmPlan) -> dict[str, object]:
        """What the summary says about how the run was made (the judge, and whether it is a model under test)."""
        models = [arm.model for arm in plan.arms]
        return {
            "judge_model": self.judge_model,
            "arm_models": models,
            "judged": self.options.judge,
            "k": self.settings.retrieval.k,
            "notes": self.notes,
        }

    async def unanswerable(self, asked: list[EvalQuestion]) -> list[EvalQuestion]:
        """The generated unanswerable questions, written by the generation model (calibration's cached call)."""
        with open_endpoint(self.settings) as endpoint:
            async with self._client(self.settings, endpoint) as (client, _):
                try:
                    found, note = await unanswerable.generate(client, self.store, self.settings, asked)
                except RequestRejectedError as exc:
                    found, note = (
                        [],
                        f"no generated unanswerable questions: the endpoint rejected the request ({exc})",
                    )
        self.notes.append(note)
        return found

    @contextlib.asynccontextmanager
    async def _client(self, settings: Settings, endpoint: Endpoint) -> AsyncIterator[tuple[LLMClient, int]]:
        client = LLMClient(
            endpoint,
            self.store,
            max_concurrency=self.settings.max_concurrency,
            max_retries=self.settings.max_retries,
            timeout_s=self.settings.request_timeout_s,
            run_id=self.run_id,
            budget=self.budget,
            requests_per_minute=self.settings.requests_per_minute,
            tokens_per_minute=self.settings.tokens_per_minute,
        )
        try:
            yield client, client.limiter.max_concurrency  # the endpoint's own bound, if smaller
        finally:
            await client.close()
            self.calls_paid += client.calls_made
            self.cache_hits += client.cache_hits

    async def _answer(self, arm: Arm, questions: list[EvalQuestion]) -> list[ArmAnswer]:
        """One arm's answer to every question; each is cached as soon as it is paid for."""
        settings = arm_settings(self.settings, arm.model)
        found: dict[str, ArmAnswer] = {}
        with open_model_endpoint(self.settings, arm.model) as endpoint:
            async with self._client(settings, endpoint) as (client, concurrency):
                slots = asyncio.Semaphore(concurrency)
                embedded = endpoint.identity.startswith("local:")
                self.progress.start(f"eval {arm.name} answers", len(questions))

                async def one(question: EvalQuestion) -> None:
                    found[question.id] = await self._one(arm, question, client, slots, embedded)
                    self.progress.advance()

                try:
                    await gather_all([one(q) for q in questions])
                finally:
                    self.progress.finish()
        return [found[q.id] for q in questions]

    async def _one(
        self, arm: Arm, question: EvalQuestion, client: LLMClient, slots: asyncio.Semaphore, embedded: bool
    ) -> ArmAnswer:
        """One answer: the bot's closed-book request, or its grounded one (which the gate may refuse uncalled)."""
        if arm.retrieval:
            from finetune_kit.eval.grounded import follow_up_query

            grounded = self.grounded()
            prompt = grounded.prepare(question, embedded, await follow_up_query(self.settings, question))
            called = (
                None
                if prompt.request is None
                else await ask_arm(client, prompt.request, self.latencies, slots)
            )
            return grounded.answer(arm, question, prompt, called)
        request = closed_book_request(self.settings, question, embedded)
        result, latency, error = await ask_arm(client, request, self.latencies, slots)
        if result is None:
            return ArmAnswer(question.id, arm.name, arm.model, "", 0.0, False, latency, error)
        return ArmAnswer(
            question.id, arm.name, arm.model, result.content.strip(), result.cost_usd, result.cached, latency
        )

    def grounded(self) -> "GroundedArm":
        """The retrieval arms' retriever over this workspace's index, opened once."""
        if self._grounded is None:
            from finetune_kit.eval.grounded import GroundedArm

            self._grounded = GroundedArm(self.store, self.settings)
        return self._grounded

    async def _judge(
        self, questions: list[EvalQuestion], answers: list[ArmAnswer]
    ) -> dict[tuple[str, str], Judgement]:
        """The judge's verdict on every answer to a gradable question."""
        by_id = {q.id: q for q in questions}
        todo = [a for a in answers if gradable(by_id[a.question_id]) and not a.error]
        checked = [a for a in answers if claims_checked(a)]
        judgements: dict[tuple[str, str], Judgement] = {}
        if not todo and not checked:
            return judgements
        settings = _judge_settings(self.settings, self.options)
        rubric, claims_rubric = load_rubric(self.settings), faithfulness.load_rubric(self.settings)
        opened = (
            open_model_endpoint(self.settings, self.options.judge_model)
            if self.options.judge_model
            else open_endpoint(settings)
        )
        with opened as endpoint:
            self.judge_model = endpoint.model
            async with self._client(settings, endpoint) as (client, _):
                self.progress.start("eval judge", len(todo) + len(checked))

                async def claims(answer: ArmAnswer) -> None:
                    answer.support = await faithfulness.check_claims(
                        client, self.settings, claims_rubric, answer.context, answer.answer
                    )
                    self.progress.advance()

                async def one(answer: ArmAnswer) -> None:
                    q = by_id[answer.question_id]
                    if answer.refused:  # a retrieval arm said "I don't know" to an answerable question
                        judgements[(q.id, answer.arm)] = Judgement("incorrect", REFUSED, 0)
                    else:
                        judgements[(q.id, answer.arm)] = await judge(
                            client, self.settings, rubric, q.question, q.reference or "", answer.answer
                        )
                    self.progress.advance()

                try:
                    await gather_all([*(one(a) for a in todo), *(claims(a) for a in checked)])
                finally:
                    self.progress.finish()
        return judgements


def estimate_eval(
    store: Store,
    settings: Settings,
    options: EvalOptions,
    plan: ArmPlan,
    questions: list[EvalQuestion],
    writing: list[ChatRequest] | None = None,
) -> list[StageEstimate]:
    """What the eval would spend now: writing the unanswerable questions, each arm, the judge; cached calls cost
    nothing and are left out."""
    estimates: list[StageEstimate] = []
    if writing:
        endpoint = planning_endpoint(settings)
        estimates.append(
            estimate_stage(
                f"eval unanswerable ({endpoint.model})",
                _uncached(store, endpoint, writing),
                endpoint,
                1.0,
            )
        )
    grounded = None
    judged: list[tuple[EvalQuestion, str | None]] = []  # (question, answer text; None: not written yet)
    checked: list[tuple[list[str], str | None]] = []  # (the sources a retrieval answer saw, its text)
    for arm in plan.arms:
        endpoint = planning_endpoint(arm_settings(settings, arm.model))
        embedded = endpoint.identity.startswith("local:")
        if arm.retrieval:
            from finetune_kit.eval.grounded import GroundedArm

            grounded = grounded or GroundedArm(store, settings)
            # a follow-up is sized with its raw question: condensing it would be a call, and a dry run makes none
            prompts = [(q, grounded.prepare(q, embedded)) for q in questions]
            prompts = [(q, p) for q, p in prompts if p.request is not None]  # the gate refuses the others
            requests = [p.request for _, p in prompts if p.request is not None]
            for q, prompt in prompts:
                assert prompt.request is not None
                answer = _cached_answer(store, endpoint, prompt.request)
                text = None
                if answer is not None:  # the answer as the bot checks it (citations), as the judge reads it
                    written = grounded.answer(arm, q, prompt, (answer, None, None))
                    if written.refused:
                        continue  # a refusal is neither judged nor checked: no call
                    text = written.answer
                judged += [(q, text)] if gradable(q) else []
                checked.append(([hit.text for hit in prompt.sources], text))
        else:
            asked = [(q, closed_book_request(settings, q, embedded)) for q in questions]
            requests = [r for _, r in asked]
            for q, r in asked:
                answer = _cached_answer(store, endpoint, r)
                judged += [(q, answer.content.strip() if answer else None)] if gradable(q) else []
        estimates.append(
            estimate_stage(
                f"eval {arm.name} ({arm.model})", _uncached(store, endpoint, requests), endpoint, 1.0
            )
        )
    if options.judge and (judged or checked):
        estimates.append(_judge_estimate(store, settings, options, judged, checked))
    return estimates


def _judge_estimate(
    store: Store,
    settings: Settings,
    options: EvalOptions,
    judged: list[tuple[EvalQuestion, str | None]],
    checked: list[tuple[list[str], str | None]],
) -> StageEstimate:
    """The judge's calls: grading each gradable answer, and checking each retrieval answer's claims."""
    judge_endpoint = planning_endpoint(_judge_settings(settings, options))
    rubric, claims_rubric = load_rubric(settings), faithfulness.load_rubric(settings)
    filler = " ".join(["word"] * TYPICAL_ANSWER_WORDS)  # the length of an answer not written yet
    requests = [
        judge_request(settings, rubric, q.question, q.reference or "", text or filler, 0)
        for q, text in judged
    ]
    requests += [
        faithfulness.claims_request(settings, claims_rubric, sources, text or filler, 0)
        for sources, text in checked
    ]
    unwritten = any(text is None for _, text in [*judged, *checked])
    return estimate_stage(
        f"eval judge ({judge_endpoint.model})",
        _uncached(store, judge_endpoint, requests),
        judge_endpoint,
        1.0,
        extrapolated=unwritten,
    )


def _uncached(store: Store, endpoint: Endpoint, requests: list[ChatRequest]) -> list[ChatRequest]:
    return [r for r in requests if cached_result(store, request_hash(endpoint, r)) is None]


def _cached_answer(store: Store, endpoint: Endpoint, request: ChatRequest) -> ChatResult | None:
    """The cached answer to `request`, or None when it is not written yet."""
    return cached_result(store, request_hash(endpoint, request))
