"""The library behind `ftkit eval`: pick questions and arms, answer, judge, score, write the report."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
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
from finetune_kit.llm.rate_limit import RateLimiter
from finetune_kit.pipeline import BATCH_NEEDS_OPENAI, DRY, recorded_run
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.slack.answerer import registered_model
from finetune_kit.stages import gather_all
from finetune_kit.stages.estimate import StageEstimate, estimate_stage, planning_endpoint
from finetune_kit.store import Store

if TYPE_CHECKING:
    from finetune_kit.eval.grounded import GroundedPrompt, Searcher

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
    if settings.batch and not options.dry_run and settings.resolved_provider != "openai":
        raise ConfigError(BATCH_NEEDS_OPENAI)
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
        from finetune_kit.eval.report import warm_chart, write_report

        evaluation = _Evaluation(
            store, settings, options, run_id, progress, Budget(limit_usd=settings.max_cost_usd)
        )
        # the chart's library loads on a thread while the calls wait on the network: from the first answer on,
        # not while the clients and the first requests are being set up
        warming = threading.Thread(target=_quietly(warm_chart), name="eval-chart", daemon=True)
        evaluation.on_first_answer = warming.start
        if unchecked is not None:
            evaluation.notes.append(f"no generated unanswerable questions: {unchecked}")
        elif _wants_unanswerable(options):
            questions += asyncio.run(evaluation.unanswerable(questions))
        answers, judgements = asyncio.run(evaluation.run(plan.arms, questions))
        run_dir = settings.workspace / "eval" / (options.run_name or _run_name())
        summary = summarize(run_dir.name, questions, plan, answers, judgements, evaluation.context(plan))
        # what the Batch API brought was paid for by this run, then read from the cache
        summary.calls_paid = evaluation.calls_paid + evaluation.batched
        summary.cache_hits = max(0, evaluation.cache_hits - evaluation.batched)
        summary.spent_usd = evaluation.budget.spent_usd + evaluation.batched_usd
        if warming.ident is not None:
            warming.join()
        write_report(run_dir, summary, questions, answers, judgements)
        return EvalOutcome(summary, run_dir, skipped=plan.skipped)


def _quietly(job: Callable[[], None]) -> Callable[[], None]:
    """`job`, its failure left to the real work to meet (and report) again."""

    def run() -> None:
        with contextlib.suppress(Exception):
            job()

    return run


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


@dataclass(frozen=True)
class _Lane:
    """One model's cached client, and the slots an answer's latency clock waits for."""

    client: LLMClient
    slots: asyncio.Semaphore

    @property
    def embedded(self) -> bool:
        """True on the embedded server (llama.cpp: one request at a time, one model loaded at a time)."""
        return self.client.endpoint.identity.startswith("local:")


class _Evaluation:
    """One eval run's calls: the arms' answers and the judge's verdicts, all through the cached client."""

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
        self.batched, self.batched_usd = (
            0,
            0.0,
        )  # answers the Batch API brought (paid, then read from the cache)
        self.batch_ids: list[str] = []
        self.judge_model = ""
        self.notes: list[str] = []  # for the report: what the run could not do, or how it chose
        self.rubric, self.claims_rubric = load_rubric(settings), faithfulness.load_rubric(settings)
        self._limiters: dict[str, RateLimiter] = {}  # one per server: it counts every model's calls together
        self._searcher: Searcher | None = None
        self.on_first_answer: Callable[[], None] | None = None  # called once, when the first answer is in

    async def run(
        self, arms: list[Arm], questions: list[EvalQuestion]
    ) -> tuple[list[ArmAnswer], dict[tuple[str, str], Judgement]]:
        """Every arm's answers and the judgement of each gradable one.

        Against a hosted endpoint every arm answers at once and each answer is judged as soon as it is in, so the
        rate limit, not the slowest phase, sets the pace. On the embedded server one arm follows another (it swaps
        models between requests of different arms) and the judge comes last; so it does with --batch, where each
        round of requests that wait on no answer is fetched through the Batch API first.
        """
        answers: dict[tuple[str, str], ArmAnswer] = {}
        judgements: dict[tuple[str, str], Judgement] = {}
        async with contextlib.AsyncExitStack() as stack:
            by_model: dict[str, _Lane] = {}  # base and rag ask the same model: one client for both
            for model in dict.fromkeys(arm.model for arm in arms):
                by_model[model] = await stack.enter_async_context(self._lane(model))
            lanes = {arm.name: by_model[arm.model] for arm in arms}
            judging = await stack.enter_async_context(self._judge_lane()) if self.options.judge else None
            if any(arm.retrieval for arm in arms):
                from finetune_kit.eval.grounded import Searcher

                self._searcher = Searcher(self.settings)
                stack.callback(self._searcher.close)
            all_lanes = [*lanes.values(), *([judging] if judging else [])]
            if self.settings.batch or any(lane.embedded for lane in all_lanes):
                await self._in_phases(arms, questions, lanes, judging, answers, judgements)
            else:
                self.progress.start("eval " + ", ".join(arm.name for arm in arms), len(arms) * len(questions))

                async def both(arm: Arm, question: EvalQuestion) -> None:
                    answer = answers[(question.id, arm.name)] = await self._one(
                        arm, question, lanes[arm.name]
                    )
                    if judging is not None:
                        await self._grade(judging, question, answer, judgements)
                    self.progress.advance()

                try:
                    await gather_all([both(arm, q) for q in questions for arm in arms])
                finally:
                    self.progress.finish()
        return [answers[(q.id, arm.name)] for arm in arms for q in questions], judgements

    async def _in_phases(
        self,
        arms: list[Arm],
        questions: list[EvalQuestion],
        lanes: dict[str, _Lane],
        judging: "_Lane | None",
        answers: dict[tuple[str, str], ArmAnswer],
        judgements: dict[tuple[str, str], Judgement],
    ) -> None:
        """One arm after another, then the judge; with --batch each phase's requests are prefilled first."""
        if self.settings.batch:
            await self._prefill(
                [await self._request(arm, q, lanes[arm.name]) for arm in arms for q in questions]
            )
        for arm in arms:
            self.progress.start(f"eval {arm.name} answers", len(questions))

            async def one(arm: Arm, question: EvalQuestion) -> None:
                answers[(question.id, arm.name)] = await self._one(arm, question, lanes[arm.name])
                self.progress.advance()

            try:
                await gather_all([one(arm, q) for q in questions])
            finally:
                self.progress.finish()
        if judging is None:
            return
        by_id = {q.id: q for q in questions}
        if self.settings.batch:
            asked = [
                (judging, r) for (q, _), a in answers.items() for r in self._verdict_requests(by_id[q], a)
            ]
            await self._prefill(asked)
        self.progress.start("eval judge", sum(self._verdicts(by_id[q], a) for (q, _), a in answers.items()))
        try:
            await gather_all(
                [self._grade(judging, by_id[q], a, judgements, True) for (q, _), a in answers.items()]
            )
        finally:
            self.progress.finish()

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
            async with self._client(self.settings, endpoint) as client:
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
    async def _client(self, settings: Settings, endpoint: Endpoint) -> AsyncIterator[LLMClient]:
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
        # the arms and the judge are models of one server, which counts their calls against one limit: one
        # limiter paces them all (and its window learns that server's rate and latency once)
        client.api.limiter = self._limiters.setdefault(endpoint.base_url, client.api.limiter)
        try:
            yield client
        finally:
            await client.close()
            self.calls_paid += client.calls_made
            self.cache_hits += client.cache_hits

    @contextlib.asynccontextmanager
    async def _lane(self, model: str) -> AsyncIterator[_Lane]:
        settings = arm_settings(self.settings, model)
        with open_model_endpoint(self.settings, model) as endpoint:
            async with self._client(settings, endpoint) as client:
                # the endpoint's own bound (the embedded server: one), if smaller than max_concurrency
                yield _Lane(client, asyncio.Semaphore(client.limiter.max_concurrency))

    @contextlib.asynccontextmanager
    async def _judge_lane(self) -> AsyncIterator[_Lane]:
        """The judge: --judge-model at its endpoint, else the generation endpoint and model."""
        settings = _judge_settings(self.settings, self.options)
        opened = (
            open_model_endpoint(self.settings, self.options.judge_model)
            if self.options.judge_model
            else open_endpoint(settings)
        )
        with opened as endpoint:
            async with self._client(settings, endpoint) as client:
                yield _Lane(client, asyncio.Semaphore(1))

    async def _request(
        self, arm: Arm, question: EvalQuestion, lane: _Lane
    ) -> tuple[_Lane, ChatRequest | None]:
        """The request that asks `arm` this question (None: the retrieval gate refuses without a call)."""
        if arm.retrieval:
            return lane, (await self._grounded(question, lane)).request
        return lane, closed_book_request(self.settings, question, lane.embedded)

    async def _grounded(self, question: EvalQuestion, lane: _Lane) -> "GroundedPrompt":
        assert self._searcher is not None
        return await self._searcher.prompt(question, lane.embedded)

    async def _one(self, arm: Arm, question: EvalQuestion, lane: _Lane) -> ArmAnswer:
        """One answer (see `_answer`), and the first one's news."""
        answer = await self._answer(arm, question, lane)
        if self.on_first_answer is not None:
            first, self.on_first_answer = self.on_first_answer, None
            first()
        return answer

    async def _answer(self, arm: Arm, question: EvalQuestion, lane: _Lane) -> ArmAnswer:
        """One answer: the bot's closed-book request, or its grounded one (which the gate may refuse uncalled)."""
        client, slots = lane.client, lane.slots
        if arm.retrieval:
            prompt = await self._grounded(question, lane)
            called = (
                None
                if prompt.request is None
                else await ask_arm(client, prompt.request, self.latencies, slots)
            )
            from finetune_kit.eval.grounded import grounded_answer

            return grounded_answer(self.settings, arm, question, prompt, called)
        request = closed_book_request(self.settings, question, lane.embedded)
        result, latency, error = await ask_arm(client, request, self.latencies, slots)
        if result is None:
            return ArmAnswer(question.id, arm.name, arm.model, "", 0.0, False, latency, error)
        return ArmAnswer(
            question.id, arm.name, arm.model, result.content.strip(), result.cost_usd, result.cached, latency
        )

    def _verdicts(self, question: EvalQuestion, answer: ArmAnswer) -> int:
        """How many verdicts the judge gives on `answer`: its grade and its claim check, where they apply."""
        return (gradable(question) and not answer.error) + claims_checked(answer)

    def _verdict_requests(self, question: EvalQuestion, answer: ArmAnswer) -> list[ChatRequest]:
        """The judge's first asks about `answer` (a retry waits on the reply): what one batch round can fetch."""
        requests = []
        if gradable(question) and not answer.error and not answer.refused:
            reference = question.reference or ""
            requests.append(
                judge_request(self.settings, self.rubric, question.question, reference, answer.answer, 0)
            )
        if claims_checked(answer):
            requests.append(
                faithfulness.claims_request(
                    self.settings, self.claims_rubric, answer.context, answer.answer, 0
                )
            )
        return requests

    async def _grade(
        self,
        lane: _Lane,
        question: EvalQuestion,
        answer: ArmAnswer,
        judgements: dict[tuple[str, str], Judgement],
        advance: bool = False,
    ) -> None:
        """The judge's verdict on an answer to a gradable question, and its check of a grounded answer's claims."""
        client = lane.client

        async def claims() -> None:
            answer.support = await faithfulness.check_claims(
                client, self.settings, self.claims_rubric, answer.context, answer.answer
            )
            if advance:
                self.progress.advance()

        async def grade() -> None:
            if answer.refused:  # a retrieval arm said "I don't know" to an answerable question
                judgements[(question.id, answer.arm)] = Judgement("incorrect", REFUSED, 0)
            else:
                judgements[(question.id, answer.arm)] = await judge(
                    client,
                    self.settings,
                    self.rubric,
                    question.question,
                    question.reference or "",
                    answer.answer,
                )
            if advance:
                self.progress.advance()

        jobs = [grade()] if gradable(question) and not answer.error else []
        jobs += [claims()] if claims_checked(answer) else []
        if jobs:
            self.judge_model = client.endpoint.model
            await gather_all(jobs)

    async def _prefill(self, asked: Sequence[tuple[_Lane, ChatRequest | None]]) -> None:
        """Fetch one round of requests through the OpenAI Batch API (half price) into the request cache; what the
        batch could not answer is asked live afterwards. The embedded server's requests are always live."""
        from finetune_kit.llm.batch import prefill_with_batch

        rounds: dict[tuple[str, str], tuple[Endpoint, dict[str, ChatRequest]]] = {}
        for lane, request in asked:
            endpoint = lane.client.endpoint
            if request is None or lane.embedded:
                continue
            key = request_hash(endpoint, request)
            if cached_result(self.store, key) is None:
                rounds.setdefault((endpoint.identity, endpoint.model), (endpoint, {}))[1][key] = request

        async def one(endpoint: Endpoint, requests: dict[str, ChatRequest]) -> None:
            report = await prefill_with_batch(
                self.store,
                endpoint,
                list(requests.values()),
                run_id=self.run_id,
                poll_interval_s=self.settings.batch_poll_interval_s,
                on_status=lambda status: log.info(
                    "batch %s: %s (%d/%d done)",
                    status.batch_id,
                    status.status,
                    status.completed,
                    status.total,
                ),
            )
            self.batch_ids += report.batch_ids
            for key, why in report.failed.items():
                log.info("batch request %s failed (%s): asked live", key, why)
            for key in requests:
                if key not in report.failed and (found := cached_result(self.store, key)) is not None:
                    self.batched, self.batched_usd = self.batched + 1, self.batched_usd + found.cost_usd

        await asyncio.gather(*(one(endpoint, requests) for endpoint, requests in rounds.values()))


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
                f"eval {arm.name} ({arm.model})",
                _uncached(store, endpoint, requests),
                endpoint,
                _price_factor(settings, endpoint),
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
        _price_factor(settings, judge_endpoint),
        extrapolated=unwritten,
    )


def _price_factor(settings: Settings, endpoint: Endpoint) -> float:
    """--batch halves what a hosted endpoint's calls cost; the embedded server's are live and free anyway."""
    from finetune_kit.llm.batch import BATCH_PRICE_FACTOR

    return BATCH_PRICE_FACTOR if settings.batch and not endpoint.identity.startswith("local:") else 1.0


def _uncached(store: Store, endpoint: Endpoint, requests: list[ChatRequest]) -> list[ChatRequest]:
    return [r for r in requests if cached_result(store, request_hash(endpoint, r)) is None]


def _cached_answer(store: Store, endpoint: Endpoint, request: ChatRequest) -> ChatResult | None:
    """The cached answer to `request`, or None when it is not written yet."""
    return cached_result(store, request_hash(endpoint, request))
