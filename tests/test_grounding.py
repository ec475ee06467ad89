"""The grounding check: answers the chunk does not support are rejected, over real HTTP, with every gate switchable."""

import hashlib
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.pipeline import run_build_dataset, run_generate_questions, run_ingest
from finetune_kit.stages.estimate import estimate_generation
from finetune_kit.stages.grounding import (
    JUDGE_ATTEMPTS,
    JUDGE_STAGE,
    PRECHECK,
    UNCHECKED,
    UNSUPPORTED,
    missing_specifics,
    parse_judgement,
    specifics,
)
from finetune_kit.status import workspace_status
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder

# What the planted answers add to a supported one: each is absent from every chunk of the sample docs.
PLANTED = {
    "flag": "Add `--turbo-mode` to make it faster.",
    "number": "It handles up to 7919 requests per second.",
    "function": "Call quillstack.rotate_key() before you start.",
    "prose": "Quillstack also replicates everything into an Oracle warehouse overnight.",
    "whole": "Quillstack keeps every value inside a Redis cluster you manage yourself.",
}
PLANTED_SHARE = 4  # in 10 questions get a planted answer


def kind_of(question: str) -> str | None:
    """Which planted claim the fake model puts into its first answer to `question`, if any."""
    roll = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    return list(PLANTED)[roll // 10 % len(PLANTED)] if roll % 10 < PLANTED_SHARE else None


def question_of(body: dict) -> str:
    match = re.search(r"^Question: (.*)$", body["messages"][0]["content"], re.M)
    return match.group(1) if match else ""


def planting_responder(body: dict) -> Reply:
    """docs_responder (questions, supported answers, the word-checking judge) with planted claims in answers."""
    reply = docs_responder(body)
    prompt = body["messages"][-1]["content"]
    is_first_answer = len(body["messages"]) == 1 and "\nQuestion: " in prompt and "<answer>" not in prompt
    kind = kind_of(question_of(body))
    if len(body["messages"]) == 3:  # a re-ask, answered from the chunk of the first question
        return docs_responder({**body, "messages": body["messages"][:1]})
    if not is_first_answer:
        return reply
    if kind is None:  # a supported answer, some with a command copied from the chunk's code
        code = re.search(r"```[^\n]*\n([^\n]+)", prompt)
        return Reply(content=f"{reply.content}\n\n```\n{code.group(1)}\n```" if code else reply.content)
    if kind == "whole":
        return Reply(content=PLANTED[kind])
    return Reply(content=f"{reply.content} {PLANTED[kind]}")


def unparseable_judge(body: dict) -> Reply:
    """A judge that never gives a verdict."""
    if "<answer>" in body["messages"][-1]["content"]:
        return Reply(content="Looks fine to me, mostly.")
    return docs_responder(body)


@pytest.fixture
def planting_llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(planting_responder, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        yield fake


def sample_settings(tmp_path: Path, **flags: object) -> Settings:
    flags = {"dedupe_across_chunks": False, **flags}  # near duplicates across chunks: tests/test_curation.py
    return load_settings(workspace=tmp_path / "ws", product="Quillstack", model="gpt-4o-mini", **flags)


def built(settings: Settings) -> None:
    run_ingest(settings, [str(SAMPLE_DOCS)])
    run_generate_questions(settings)
    run_build_dataset(settings)


def current_answers(settings: Settings) -> list[sqlite3.Row]:
    """The answers build-dataset wrote last (the newest answer key), with their questions."""
    with Store(settings.db_path) as store:
        key = store.scalar("SELECT answer_key FROM answers ORDER BY created_at DESC, rowid DESC LIMIT 1")
        return store.db.execute(
            "SELECT q.text AS question, a.text, a.status, a.reason FROM answers a"
            " JOIN questions q ON q.id = a.question_id WHERE a.answer_key = ?",
            (key,),
        ).fetchall()


def planted_in_dataset(row: sqlite3.Row) -> bool:
    return row["status"] == "accepted" and any(claim in row["text"] for claim in PLANTED.values())


def test_the_check_rejects_planted_claims_and_keeps_supported_answers(
    tmp_path: Path, planting_llm: FakeOpenAI
) -> None:
    settings = sample_settings(tmp_path)
    built(settings)

    rows = current_answers(settings)
    planted = [row for row in rows if kind_of(row["question"])]
    supported = [row for row in rows if not kind_of(row["question"])]
    assert len(planted) >= 20 and len(supported) >= 20
    caught = sum(not planted_in_dataset(row) for row in planted) / len(planted)
    wrongly_rejected = sum(row["status"] == "rejected" for row in supported) / len(supported)
    assert caught >= 0.95, [row["reason"] for row in planted if planted_in_dataset(row)]
    assert wrongly_rejected <= 0.05, [row["reason"] for row in supported if row["status"] == "rejected"]


def test_each_gate_names_what_the_chunk_does_not_hold(tmp_path: Path, planting_llm: FakeOpenAI) -> None:
    settings = sample_settings(tmp_path)
    built(settings)

    reasons = {kind_of(row["question"]): row["reason"] for row in current_answers(settings)}
    assert reasons["flag"] == f"{PRECHECK} — --turbo-mode"
    assert reasons["number"] == f"{PRECHECK} — 7919 requests"
    assert reasons["function"] == f"{PRECHECK} — quillstack.rotate_key"
    assert reasons["whole"] == f"{UNSUPPORTED} — {PLANTED['whole']}"
    assert reasons["prose"] is None  # partly supported, asked again once, and the re-ask is supported


def test_a_re_run_with_every_gate_on_costs_no_calls(tmp_path: Path, planting_llm: FakeOpenAI) -> None:
    settings = sample_settings(tmp_path)
    built(settings)
    sent = len(planting_llm.requests)

    summary = run_build_dataset(settings)

    assert len(planting_llm.requests) == sent
    assert summary.llm_calls == 0 and summary.dataset is not None and summary.dataset.answered == 0


def test_switching_the_judge_off_asks_nothing_but_changes_what_is_accepted(
    tmp_path: Path, planting_llm: FakeOpenAI
) -> None:
    built(sample_settings(tmp_path))
    sent = len(planting_llm.requests)

    without_judge = sample_settings(tmp_path, grounding_judge=False)
    summary = run_build_dataset(without_judge)

    assert len(planting_llm.requests) == sent  # the answers are in the request cache
    assert summary.dataset is not None and summary.dataset.answered > 0
    by_kind = {kind_of(row["question"]): row for row in current_answers(without_judge)}
    assert by_kind["whole"]["status"] == by_kind["prose"]["status"] == "accepted"
    assert PLANTED["prose"] in by_kind["prose"]["text"]  # no judge, so no re-ask
    assert by_kind["flag"]["reason"] == f"{PRECHECK} — --turbo-mode"  # the pre-check still runs

    run_build_dataset(sample_settings(tmp_path, grounding_judge=False, grounding_precheck=False))
    assert len(planting_llm.requests) == sent
    assert {row["status"] for row in current_answers(without_judge)} == {"accepted"}

    run_build_dataset(sample_settings(tmp_path))  # back on: every judge call is cached
    assert len(planting_llm.requests) == sent


def test_a_judge_without_a_verdict_is_asked_again_then_the_answer_is_kept_unchecked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(unparseable_judge, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        settings = sample_settings(tmp_path)
        built(settings)
        judged = [body for body in fake.requests if "<answer>" in body["messages"][-1]["content"]]

    rows = current_answers(settings)
    assert len(judged) == JUDGE_ATTEMPTS * len(rows)
    assert {row["status"] for row in rows} == {"accepted"}
    assert {row["reason"] for row in rows} == {
        f"{UNCHECKED} — no verdict in {JUDGE_ATTEMPTS} replies; kept without a check"
    }
    assert workspace_status(settings).answers == {UNCHECKED: len(rows)}


def test_status_counts_answers_by_gate(tmp_path: Path, planting_llm: FakeOpenAI) -> None:
    settings = sample_settings(tmp_path)
    built(settings)

    report = workspace_status(settings)

    rows = current_answers(settings)
    assert set(report.answers) == {"accepted", PRECHECK, UNSUPPORTED}
    assert sum(report.answers.values()) == len(rows)
    assert report.answers[PRECHECK] == sum(
        kind_of(row["question"]) in {"flag", "number", "function"} for row in rows
    )
    assert report.grounding == "pre-check on, judge on"
    assert ("grounding check", "pre-check on, judge on") in report.rows()


def test_a_dry_run_prices_one_judge_call_per_answer_and_none_once_done(
    tmp_path: Path, planting_llm: FakeOpenAI
) -> None:
    settings = sample_settings(tmp_path)
    run_ingest(settings, [str(SAMPLE_DOCS)])
    run_generate_questions(settings)
    with Store(settings.db_path) as store:
        estimates = {e.stage: e for e in estimate_generation(store, settings, questions=False)}
    assert estimates[JUDGE_STAGE].calls == estimates["build-dataset"].calls > 0

    run_build_dataset(settings)
    with Store(settings.db_path) as store:
        assert [e.calls for e in estimate_generation(store, settings)] == [0, 0, 0]


def test_batch_mode_sends_the_judge_calls_through_the_batch_api(
    tmp_path: Path, planting_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_BATCH_POLL_INTERVAL_S", "0.01")
    settings = sample_settings(tmp_path, batch=True)
    built(settings)

    live = [body["messages"][-1]["content"] for body in planting_llm.requests]
    reasks = [prompt for prompt in live if prompt.startswith("Your answer says something")]
    judges = [prompt for prompt in live if "<answer>" in prompt]
    # only what waits on a judge's verdict goes live: the re-asks of partly supported answers, and their judges
    prose = sum(kind_of(row["question"]) == "prose" for row in current_answers(settings))
    assert len(reasks) == len(judges) == prose > 0 and len(live) == 2 * prose


@pytest.mark.parametrize(
    ("answer", "found"),
    [
        ("Run `ftkit run --model x` first.", ["ftkit run --model x"]),
        ("Use --max-cost and set MAX_COST_USD or maxRetries.", ["--max-cost", "MAX_COST_USD", "maxRetries"]),
        ("It waits 30 seconds, retries 3 times, then 1,500 ms.", ["30 seconds", "1,500 ms"]),
        ("1. Open the file.\n2. Save it.", []),
        ("```bash\n$ pip install quillstack  # once\n```", ["pip install quillstack"]),
        (
            "See https://docs.example.com/a and client.flags.get(name).",
            ["https://docs.example.com/a", "client.flags.get"],
        ),
    ],
)
def test_specifics_are_the_commands_options_numbers_and_identifiers(answer: str, found: list[str]) -> None:
    assert specifics(answer) == found


def test_a_specific_counts_as_present_whatever_its_spacing_case_or_thousands_separator() -> None:
    chunk = "Set `timeout_s`\nto 1500 ms with\n`ftkit   run  --max-cost 2`."
    assert missing_specifics("Use `ftkit run --max-cost 2`; TIMEOUT_S is 1,500ms.", chunk, []) == []
    assert missing_specifics("Use `ftkit run --fast`.", chunk, []) == ["ftkit run --fast"]
    assert (
        missing_specifics("Try `ftkit run --max-cost 1500`.", chunk, []) == []
    )  # written from the chunk's parts
    assert missing_specifics("Try `ftkit run --max-cost 99`.", chunk, []) == ["ftkit run --max-cost 99"]
    assert missing_specifics("Quillstack_Cloud is 15 ms.", chunk, ["Quillstack_Cloud"]) == ["15 ms"]


@pytest.mark.parametrize(
    ("reply", "verdict", "claim"),
    [
        ("Verdict: supported\nUnsupported claim: none", "supported", ""),
        ("Verdict: **unsupported**\nUnsupported claim: it uses Redis.", "unsupported", "it uses Redis."),
        ("verdict = partly\nunsupported claim: the 5 s default", "partly", "the 5 s default"),
        ('{"verdict": "not supported", "claim": "x"}', "unsupported", "x"),
        ("Partially supported.", "partly", ""),
        ("Verdict: supported, partly or unsupported", None, ""),  # the instructions, echoed
        ("I cannot tell.", None, ""),
    ],
)
def test_parse_judgement(reply: str, verdict: str | None, claim: str) -> None:
    found = parse_judgement(reply)
    assert (found.verdict, found.claim) == (verdict, claim)
