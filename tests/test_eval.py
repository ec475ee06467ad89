"""`ftkit eval` over real HTTP: a base model that answers badly, a fine-tuned one that knows the references, a judge
with a fixed verdict and one reply it can never parse; the cache, the report and the verdict line."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.errors import ConfigError
from finetune_kit.eval.arms import parse_arm_names, plan_arms
from finetune_kit.eval.faithfulness import ClaimCheck, parse_claims
from finetune_kit.eval.judge import parse_verdict
from finetune_kit.eval.metrics import bootstrap, key_term_recall, retrieval_scores, sign_test, token_f1
from finetune_kit.eval.questions import load_questions_file
from finetune_kit.eval.report import load_summary, summary_table
from tests.conftest import REPO, SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder

MODELS = ["--model", "base-model", "--ft-model", "ft-model", "--judge-model", "judge-model"]
PRODUCT = ["--product", "Quillstack"]
# what the model writes when asked for questions the docs do not describe: the second one the docs do answer
WRITTEN_UNANSWERABLE = [
    "Does Quillstack have an official Android app for managing flags?",
    "How do I archive a flag with the quill CLI?",
    "Can I log in to Quillstack with Okta?",
]
_GRADED = re.compile(r"Question: (.*?)\n\nReference answer: (.*?)\n\nAnswer to grade: (.*?)\n\nReply", re.S)


@dataclass
class EvalModels:
    """The fake's models: base answers a third of the questions right, ft all of them, judge compares."""

    references: dict[str, str] = field(default_factory=dict)  # question -> reference (validation.jsonl)
    garbage: set[str] = field(default_factory=set)  # questions the judge never gives a verdict on
    delay_s: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)  # more references ft knows, for one test

    def base_knows(self, question: str) -> bool:
        return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 3 == 0

    def __call__(self, body: dict) -> Reply:
        model, prompt = body["model"], body["messages"][-1]["content"]
        system = body["messages"][0]["content"]
        if "do NOT describe" in prompt:  # calibration's (and eval's) request for unanswerable questions
            reply = Reply("\n".join(f"{i}. {q}" for i, q in enumerate(WRITTEN_UNANSWERABLE, 1)))
        elif model != "judge-model" and "Sources:\n\n[1] " in system:
            reply = self.grounded(model, prompt, system)
        elif model == "judge-model" and "Answer to check:" in prompt:
            reply = self.claims(prompt)
        elif model == "judge-model":
            reply = self.judge(prompt)
        elif model == "ft-model":
            reply = Reply((self.references | self.extra).get(prompt, "I don't know."))
        elif model == "base-model":
            known = self.base_knows(prompt)
            reply = Reply(
                (self.references | self.extra).get(prompt, "")  # nothing: a refusal
                if known
                else "Try restarting it and see the settings page."
            )
        else:
            reply = docs_responder(body)
        reply.delay_s = self.delay_s
        return reply

    def grounded(self, model: str, question: str, system: str) -> Reply:
        """With sources: ft cites its reference to [1]; base quotes source 1, and cites a [7] it was not given."""
        if model == "ft-model":
            return Reply(f"{(self.references | self.extra).get(question, 'I do not know.')} [1]")
        source = system.split("\n\n[1] ", 1)[1].split("\n", 2)[2]
        sentence = re.split(r"(?<=[.!?])\s", " ".join(source.split()), maxsplit=1)[0]
        return Reply(f"{sentence} [1]" + (" See also [7]." if self.base_knows(question) else ""))

    def claims(self, prompt: str) -> Reply:
        """Each sentence of 3+ words a claim, supported when the sources hold all its words; no claim lines for
        the ft+rag answers `claims_garbled` picks."""
        sources = prompt.split("<sources>", 1)[1].split("</sources>", 1)[0]
        answer = prompt.split("<answer>\n", 1)[1].split("\n</answer>", 1)[0]
        if claims_garbled(answer):
            return Reply("The answer looks grounded to me.")
        known = set(re.findall(r"\w+", sources.lower()))
        lines = [
            f"CLAIM: {sentence} | {'SUPPORTED' if set(said) <= known else 'UNSUPPORTED'}"
            for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\[\d+\]", "", answer))
            if len(said := re.findall(r"\w+", sentence.lower())) >= 3
        ]
        return Reply("\n".join(lines) or "NO CLAIMS")

    def judge(self, prompt: str) -> Reply:
        question, reference, answer = _GRADED.search(prompt).groups()  # type: ignore[union-attr]
        if question in self.garbage:
            return Reply("Looks fine to me!")
        verdict = "correct" if answer.strip() == reference.strip() else "incorrect"
        return Reply(f"VERDICT: {verdict}\nREASON: compared with the reference.")


def claims_garbled(answer: str) -> bool:
    """The ft+rag answers (the references, which start so) whose claim check never parses: a third of them."""
    return (
        answer.startswith("The documentation says") and hashlib.sha256(answer.encode()).digest()[0] % 3 == 0
    )


@pytest.fixture(scope="module")
def models() -> EvalModels:
    return EvalModels()


@pytest.fixture(scope="module")
def fake(models: EvalModels) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(models, api_key=TEST_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def built(fake: FakeOpenAI, models: EvalModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a dataset of the sample docs, built once; each test works on a copy."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith(("FTKIT_", "OPENAI_"))]:
            mp.delenv(name)
        mp.setenv("OPENAI_BASE_URL", fake.url)
        mp.setenv("OPENAI_API_KEY", TEST_KEY)
        mp.setenv("FTKIT_TRAIN_AFTER_DATASET", "false")
        mp.chdir(root)
        result = CliRunner().invoke(app, ["--workspace", "ws", "run", str(SAMPLE_DOCS), *PRODUCT])
        assert result.exit_code == 0, result.stderr
    for line in (root / "ws" / "dataset" / "validation.jsonl").read_text().splitlines():
        messages = {m["role"]: m["content"] for m in json.loads(line)["messages"]}
        models.references[messages["user"]] = messages["assistant"]
    models.garbage = {sorted(models.references)[0]}
    return root / "ws"


@pytest.fixture
def ws(
    built: Path, fake: FakeOpenAI, models: EvalModels, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    shutil.copytree(built, tmp_path / "ws")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    models.delay_s, models.extra = 0.0, {}
    return tmp_path / "ws"


def ftkit(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--workspace", "ws", *args])
    return result.exit_code, result.stdout, result.stderr


def eval_json(*args: str) -> dict:
    code, out, err = ftkit("eval", *MODELS, *PRODUCT, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def results(ws: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (ws / "eval" / run / "results.jsonl").read_text().splitlines()]


def arm(summary: dict, name: str) -> dict:
    return next(a for a in summary["arms"] if a["name"] == name)


# --- the arms, their figures and the verdict ----------------------------------------------------------


def test_eval_scores_each_arm_with_intervals_and_a_computed_verdict(ws: Path, models: EvalModels) -> None:
    summary = eval_json("--name", "first", "--arms", "base,ft", "--no-unanswerable")
    assert [a["name"] for a in summary["arms"]] == ["base", "ft"] and not summary["skipped"]
    n = len(models.references)
    assert summary["n_questions"] == n and summary["origins"] == {"held-out": n}
    for a in summary["arms"]:
        for name, figure in a["metrics"].items():
            if figure["value"] is not None:
                assert figure["low"] <= figure["value"] <= figure["high"], (a["name"], name)

    lines = results(ws, "first")
    assert len(lines) == 2 * n
    verdicts = {(r["arm"], r["question"]): r["verdict"] for r in lines}
    expected_base = [q for q in models.references if q not in models.garbage]
    base_right = sum(models.base_knows(q) for q in expected_base)
    assert arm(summary, "ft")["metrics"]["correct"] == {"value": 1.0, "low": 1.0, "high": 1.0, "n": n - 1}
    assert arm(summary, "base")["metrics"]["correct"]["value"] == pytest.approx(base_right / (n - 1))
    assert all(verdicts[("ft", q)] == "correct" for q in expected_base)
    wins = (n - 1) - base_right
    base_pct = round(100 * base_right / (n - 1))
    assert summary["verdict"].startswith(
        f"On {n} held-out questions, ft answered 100 % correctly (100–100 %), base {base_pct} %"
    )
    assert f"ft beats base on {wins} questions and loses on 0 (significant" in summary["verdict"]


def test_a_judge_reply_without_a_verdict_is_retried_once_then_unjudged_never_zero(
    ws: Path, fake: FakeOpenAI, models: EvalModels
) -> None:
    start = len(fake.requests)
    summary = eval_json("--name", "judged", "--arms", "ft")
    (garbage,) = models.garbage
    record = next(r for r in results(ws, "judged") if r["question"] == garbage)
    assert record["verdict"] == "unjudged" and record["judge_attempts"] == 2
    assert record["scores"]["correct"] is None
    asked = [
        b
        for b in fake.requests[start:]
        if b["model"] == "judge-model" and f"Question: {garbage}\n" in b["messages"][0]["content"]
    ]
    assert [b["seed"] for b in asked] == [0, 1] and {b["temperature"] for b in asked} == {0}
    assert arm(summary, "ft")["unjudged"] == 1
    assert arm(summary, "ft")["metrics"]["correct"]["value"] == 1.0  # left out, not counted as 0
    assert any("1 answers unjudged" in note for note in summary["notes"])


def test_no_fine_tuned_model_skips_the_ft_arms_with_a_note(ws: Path) -> None:
    judge = ["--judge-model", "judge-model"]
    code, out, err = ftkit("eval", "--model", "base-model", *judge, *PRODUCT, "--arms", "base,ft", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [a["name"] for a in summary["arms"]] == ["base"]
    assert list(summary["skipped"]) == ["ft"] and "no fine-tuned model" in summary["skipped"]["ft"]
    assert "ft skipped: no fine-tuned model" in err


def test_retrieval_arms_answer_from_the_index_with_checked_sources(
    ws: Path, fake: FakeOpenAI, models: EvalModels
) -> None:
    pytest.importorskip("finetune_kit.retrieval.answer", reason="the retrieval arms need retrieval/answer.py")
    assert ftkit("index")[0] == 0
    summary = eval_json("--arms", "base,ft", "--name", "closed")
    before = len(fake.requests)
    summary = eval_json("--name", "all")  # default: every arm that exists
    assert [a["name"] for a in summary["arms"]] == ["base", "ft", "rag", "ft+rag"] and not summary["skipped"]
    new = fake.requests[before:]
    lines = [r for r in results(ws, "all") if r["arm"] in ("rag", "ft+rag")]
    gated = [r for r in lines if r["refused_before_model"]]  # below the calibrated threshold: no call
    grounded = [b for b in new if b["model"] != "judge-model"]
    assert len(grounded) == len(lines) - len(gated)  # the closed-book arms were paid for already
    assert all("Sources:\n\n[1] " in b["messages"][0]["content"] for b in grounded)
    assert all(r["cost_usd"] == 0 and r["latency_ms"] is None for r in gated)
    n = len(models.references)
    rag, ft_rag = arm(summary, "rag"), arm(summary, "ft+rag")
    rag_lines = [r for r in lines if r["arm"] == "rag"]
    answered = [r for r in rag_lines if not r["refused_before_model"]]
    for figure in (
        "recall_at_k",
        "mrr",
        "ndcg",
    ):  # the ranking is scored whether or not the gate let it through
        assert rag["metrics"][figure]["n"] == n, figure
        assert 0 <= rag["metrics"][figure]["value"] <= 1
    assert rag["metrics"]["faithfulness"]["n"] == rag["metrics"]["citation_precision"]["n"] == len(answered)
    assert "recall_at_k" not in [m for m, f in arm(summary, "base")["metrics"].items() if f["n"]]
    for r in rag_lines:
        assert len(r["retrieved"]) == 10 and r["retrieved"][0]["rank"] == 1
        shown = {s["url"] for s in r["sources"]}
        assert shown <= {h["url"] for h in r["retrieved"]}  # every source shown is a retrieved chunk
        assert "[7]" not in r["answer"]  # the number it was never given is dropped
    # base quotes source 1 (faithful) and cites a [7] for a third of the questions: precision below 1
    assert rag["metrics"]["faithfulness"]["value"] == rag["metrics"]["lexical_support"]["value"] == 1.0
    assert all(r["claims"] and all(c["supported"] for c in r["claims"]) for r in answered)
    # faithfulness is the judge's share of supported claims; a check that never parses is left out, never a 0
    ft_checked = [r for r in lines if r["arm"] == "ft+rag" and r["claims_attempts"]]
    garbled = [r for r in ft_checked if claims_garbled(r["answer"])]
    assert garbled and all(r["claims"] is None and r["claims_attempts"] == 2 for r in garbled), [
        (r["answer"], r["claims"], r["claims_attempts"]) for r in garbled
    ]
    assert all(r["scores"]["faithfulness"] is None and r["claims_unjudged"] for r in garbled)
    judged_claims = [r for r in ft_checked if r not in garbled]
    assert ft_rag["metrics"]["faithfulness"]["n"] == len(judged_claims)
    shares = [sum(c["supported"] for c in r["claims"]) / len(r["claims"]) for r in judged_claims]
    assert ft_rag["metrics"]["faithfulness"]["value"] == pytest.approx(sum(shares) / len(shares))
    retried = [
        b
        for b in new
        if "Answer to check:" in b["messages"][0]["content"]
        and f"<answer>\n{garbled[0]['answer']}\n</answer>" in b["messages"][0]["content"]
    ]
    # each claim check of that answer (several questions may get the same garbled answer) is asked twice: seed 0, 1
    seeds: dict[str, list[int]] = {}
    for b in retried:
        seeds.setdefault(b["messages"][0]["content"], []).append(b["seed"])
    assert seeds and all(sorted(s) == [0, 1] for s in seeds.values()), seeds
    assert {b["temperature"] for b in retried} == {0}
    assert any(f"{len(garbled)} answers' claims unjudged" in note for note in summary["notes"])
    cited_7 = sum(models.base_knows(r["question"]) for r in answered)
    assert (
        cited_7 and rag["metrics"]["citation_precision"]["value"] <= 1 - cited_7 / (2 * len(answered)) + 1e-9
    )
    gold_1 = [r["scores"]["recall_at_k"] for r in rag_lines if r["answerable"]]
    assert (
        ft_rag["metrics"]["recall_at_k"]["value"] == rag["metrics"]["recall_at_k"]["value"] == sum(gold_1) / n
    )


def test_a_follow_up_in_a_retrieval_arm_is_searched_as_the_bot_searches_it(
    ws: Path, fake: FakeOpenAI, tmp_path: Path
) -> None:
    pytest.importorskip("finetune_kit.retrieval.answer", reason="the retrieval arms need retrieval/answer.py")
    path = tmp_path / "follow-up.jsonl"
    history = [
        {"role": "user", "text": "How do I create a flag?"},
        {"role": "assistant", "text": "Run quill flag create."},
    ]
    path.write_text(json.dumps({"id": "f", "question": "And how do I delete it?", "history": history}) + "\n")
    start = len(fake.requests)
    summary = eval_json("--questions", str(path), "--arms", "rag", "--no-judge", "--name", "follow-up")
    assert arm(summary, "rag")["answers"] == 1 and arm(summary, "rag")["errors"] == 0
    asked = [b for b in fake.requests[start:] if b["model"] == "base-model"]
    assert len(asked) == 1 and [m["role"] for m in asked[0]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]


def test_an_index_built_with_another_embedder_skips_the_retrieval_arms_with_a_note(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("finetune_kit.retrieval.answer", reason="the retrieval arms need retrieval/answer.py")
    assert ftkit("index")[0] == 0
    monkeypatch.setenv("FTKIT_RETRIEVAL_EMBEDDING_MODEL", "text-embedding-3-small")
    summary = eval_json("--arms", "base,rag")
    assert [a["name"] for a in summary["arms"]] == ["base"]
    assert "ftkit index --rebuild" in summary["skipped"]["rag"]


def test_unanswerable_questions_are_generated_checked_against_the_index_and_refusals_counted(
    ws: Path, fake: FakeOpenAI, models: EvalModels
) -> None:
    pytest.importorskip("finetune_kit.retrieval.answer", reason="the check needs the index")
    summary = eval_json("--arms", "base,ft", "--name", "u")
    n = len(models.references)
    assert summary["origins"] == {"held-out": n, "generated unanswerable": 2}
    assert summary["n_questions"] == n + 2
    assert any(
        note.startswith("2 generated unanswerable questions (2 of 3 the model wrote kept;")
        and "the docs use every key term: 1" in note
        for note in summary["notes"]
    ), summary["notes"]
    lines = [r for r in results(ws, "u") if not r["answerable"]]
    kept = [WRITTEN_UNANSWERABLE[0], WRITTEN_UNANSWERABLE[2]]
    assert sorted({r["question"] for r in lines}) == sorted(kept)  # the archive question is answerable
    assert all(r["question_id"].startswith("u:") and r["verdict"] is None for r in lines)
    by_arm = {(r["arm"], r["question"]): r["scores"]["refusal_accuracy"] for r in lines}
    assert all(by_arm[("ft", q)] == 1.0 for q in kept)  # ft says "I don't know."
    assert all(by_arm[("base", q)] == float(models.base_knows(q)) for q in kept)  # base refuses only those
    base = arm(summary, "base")["metrics"]["refusal_accuracy"]
    assert base["n"] == n + 2
    assert "generated unanswerable" in summary["verdict"]

    before = len(fake.requests)
    again = eval_json("--arms", "base,ft", "--name", "u2")
    assert len(fake.requests) == before and again["calls_paid"] == 0
    assert again["origins"] == summary["origins"]
    off = eval_json("--arms", "base,ft", "--no-unanswerable", "--name", "off")
    assert off["origins"] == {"held-out": n}


def test_no_index_skips_the_retrieval_arms_and_the_unanswerable_questions_with_a_note(
    ws: Path, fake: FakeOpenAI
) -> None:
    with sqlite3.connect(ws / "state.db") as db:
        db.execute("DELETE FROM index_meta")  # as if `ftkit index` never ran
    start = len(fake.requests)
    code, out, err = ftkit("eval", *MODELS, *PRODUCT, "--arms", "base,rag,ft+rag", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [a["name"] for a in summary["arms"]] == ["base"]
    assert set(summary["skipped"]) == {"rag", "ft+rag"}
    assert "run `ftkit index`" in summary["skipped"]["rag"] and "rag skipped: no retrieval" in err
    assert any("no generated unanswerable questions: no index" in note for note in summary["notes"])
    assert not any("do NOT describe" in b["messages"][-1]["content"] for b in fake.requests[start:])


def test_a_judge_that_is_a_model_under_test_is_allowed_but_flagged(ws: Path) -> None:
    code, out, err = ftkit(
        "eval", "--model", "base-model", "--judge-model", "base-model", *PRODUCT, "--arms", "base", "--json"
    )
    assert code == 0, err
    flagged = "the judge (base-model) is also a model under test"
    assert any(note.startswith(flagged) for note in json.loads(out)["notes"])
    assert not any("also a model under test" in note for note in eval_json("--arms", "base")["notes"])


def test_arms_without_a_model_or_retrieval_are_skipped_with_why() -> None:
    plan = plan_arms(parse_arm_names("base,ft,rag,ft+rag"), "base-model", None, "no index: run `ftkit index`")
    assert [a.name for a in plan.arms] == ["base"]
    assert plan.skipped["rag"] == "no retrieval: no index: run `ftkit index`"
    assert "no fine-tuned model" in plan.skipped["ft"] and "no fine-tuned model" in plan.skipped["ft+rag"]
    with pytest.raises(ConfigError, match="unknown arm 'rgb'"):
        parse_arm_names("base,rgb")


# --- never pay twice ----------------------------------------------------------------------------------


def test_a_rerun_makes_no_requests_and_reports_the_same_figures(ws: Path, fake: FakeOpenAI) -> None:
    first = eval_json("--name", "a")
    before = len(fake.requests)
    second = eval_json("--name", "b")
    assert len(fake.requests) == before
    assert second["calls_paid"] == 0 and second["cache_hits"] > 0
    assert second["arms"] == first["arms"]  # latency included: it is kept with each paid call
    assert second["verdict"] == first["verdict"]


def test_adding_an_arm_pays_only_for_that_arm(ws: Path, fake: FakeOpenAI, models: EvalModels) -> None:
    eval_json("--arms", "base")
    before = len(fake.requests)
    asked = eval_json("--arms", "base,ft")["n_questions"]  # the held-out ones and the unanswerable ones
    new = fake.requests[before:]
    # a judgement base's answer already got (the same question, reference and answer) is not paid again
    judged_before = {q for q in models.references if models.base_knows(q)}
    fresh = [q for q in models.references if q not in judged_before]
    judge_calls = len(fresh) + len(models.garbage & set(fresh))  # the garbage reply is asked twice
    assert Counter(b["model"] for b in new) == {"ft-model": asked, "judge-model": judge_calls}
    assert judged_before  # the cache really was used across arms


def test_dry_run_prints_calls_and_dollars_and_sends_nothing(
    ws: Path, fake: FakeOpenAI, models: EvalModels
) -> None:
    before = len(fake.requests)
    code, out, err = ftkit("eval", *MODELS, *PRODUCT, "--arms", "base,ft", "--dry-run")
    assert code == 0, err
    assert len(fake.requests) == before
    n = len(models.references)
    assert re.search(rf"eval base[^│]*│\s+{n}\s", out), out
    assert re.search(rf"eval judge[^│]*│\s+{2 * n}\s", out), out
    assert "answers not yet written" in out
    assert re.search(r"eval unanswerable[^│]*│\s+1\s", out), out  # written by one call
    assert "The unanswerable questions are not written yet" in out
    assert "Dry run: nothing was sent" in out
    eval_json("--arms", "base,ft")
    code, out, _ = ftkit("eval", *MODELS, *PRODUCT, "--arms", "base,ft", "--dry-run")
    assert re.search(r"total\s+│\s+0\s", out), out


def test_max_cost_stops_cleanly_and_the_rerun_pays_only_the_rest(
    ws: Path, fake: FakeOpenAI, monkeypatch
) -> None:
    monkeypatch.setitem(
        os.environ, "FTKIT_PRICES", json.dumps({"base-model": {"input": 1000, "output": 1000}})
    )
    start = len(fake.requests)
    code, _, err = ftkit("eval", *MODELS, *PRODUCT, "--arms", "base", "--max-cost", "1")
    assert code == 1 and "--max-cost" in err
    answers = [b for b in fake.requests[start:] if b["model"] == "base-model"]
    assert len(answers) == 1  # one answer's worst case fits in $1, a second does not
    with sqlite3.connect(ws / "state.db") as db:
        spent = db.execute("SELECT sum(cost_usd) FROM llm_calls WHERE stage = 'eval-answer'").fetchone()[0]
    assert 0 < spent <= 1  # stopped before it could spend more, and what it paid for is kept
    monkeypatch.delenv("FTKIT_PRICES")
    resumed = len(fake.requests)
    eval_json("--arms", "base", "--name", "rest")
    seen = Counter(json.dumps(b, sort_keys=True) for b in fake.requests[start:])
    assert max(seen.values()) == 1  # no request was sent twice across the stopped run and the re-run
    rest = [b for b in fake.requests[resumed:] if b["model"] == "base-model"]
    assert len(rest) + 1 == len(results(ws, "rest"))  # the re-run paid only for the answers still missing


SAME_IN_BOTH = ("arm", "question", "answer", "verdict", "judge_attempts", "claims", "claims_attempts")
SAME_IN_BOTH += ("claims_unjudged", "sources", "retrieved", "refused_before_model", "error")


def test_batch_eval_asks_through_batches_the_same_as_live_and_a_rerun_asks_nothing(
    ws: Path, fake: FakeOpenAI, models: EvalModels, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("finetune_kit.retrieval.answer", reason="the retrieval arms need retrieval/answer.py")
    assert ftkit("index")[0] == 0
    shutil.copytree(ws, tmp_path / "live")  # the same workspace, its cache empty of eval calls
    monkeypatch.setenv("FTKIT_BATCH_POLL_INTERVAL_S", "0.01")
    price = {"input": 1.0, "output": 2.0}
    monkeypatch.setenv(
        "FTKIT_PRICES", json.dumps(dict.fromkeys(["base-model", "ft-model", "judge-model"], price))
    )
    args = ("--no-unanswerable", "--name", "run")
    live_before, batch_before = len(fake.requests), len(fake.batch_api.calls)
    batched = eval_json("--batch", *args)

    live = fake.requests[live_before:]
    # what waits on a reply goes live: the judge's second ask about a reply it could not parse (seed 1)
    assert live and all(body["seed"] == 1 and body["model"] == "judge-model" for body in live)
    calls = Counter(fake.batch_api.calls[batch_before:])
    # a round of answers (one batch per model), then a round of verdicts on them (the judge's batch)
    assert calls["POST /v1/batches"] == 3 and calls["POST /v1/files"] == 3
    assert batched["calls_paid"] > len(live)  # what the batches brought was paid for by this run

    result = CliRunner().invoke(
        app, ["--workspace", str(tmp_path / "live"), "eval", *MODELS, *PRODUCT, "--json", *args]
    )
    assert result.exit_code == 0, result.stderr
    plain = json.loads(result.stdout)
    assert batched["calls_paid"] == plain["calls_paid"]
    assert 0 < batched["spent_usd"] < plain["spent_usd"]  # the Batch API's half price
    kept = [{k: r[k] for k in SAME_IN_BOTH} for r in results(ws, "run")]
    assert kept == [{k: r[k] for k in SAME_IN_BOTH} for r in results(tmp_path / "live", "run")]
    assert [a["name"] for a in batched["arms"]] == ["base", "ft", "rag", "ft+rag"]
    assert [a["metrics"]["correct"] for a in batched["arms"]] == [
        a["metrics"]["correct"] for a in plain["arms"]
    ]

    live_before, batch_before = len(fake.requests), len(fake.batch_api.calls)
    again = eval_json("--batch", "--no-unanswerable")
    assert len(fake.requests) == live_before and len(fake.batch_api.calls) == batch_before
    assert again["calls_paid"] == 0 and again["spent_usd"] == 0


def test_batch_eval_needs_the_openai_api(ws: Path, fake: FakeOpenAI) -> None:
    before = len(fake.requests)
    code, _, err = ftkit("eval", *MODELS, *PRODUCT, "--provider", "local", "--batch")
    assert code == 1
    assert err == (
        "Error: --batch uses the OpenAI Batch API — set OPENAI_API_KEY (or --provider openai), or drop --batch\n"
    )
    assert len(fake.requests) == before and not (ws / "eval").exists()


def test_kill_9_mid_eval_loses_nothing(
    ws: Path, fake: FakeOpenAI, models: EvalModels, tmp_path: Path
) -> None:
    models.delay_s = 0.05
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTKIT_")}
    env.update(PYTHONPATH=str(REPO), FTKIT_MAX_CONCURRENCY="2")
    start = len(fake.requests)
    arms = ["--arms", "base,ft"]
    command = [sys.executable, "-m", "finetune_kit", "--workspace", "ws", "eval", *MODELS, *PRODUCT, *arms]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while len(fake.requests) - start < 8 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    models.delay_s = 0.0
    with sqlite3.connect(ws / "state.db") as db:
        kept = {row[0] for row in db.execute("SELECT request_json FROM llm_calls WHERE stage LIKE 'eval-%'")}
    assert kept, "the kill came before any answer was stored"
    resumed = len(fake.requests)
    summary = eval_json(*arms)
    again = {json.dumps(b) for b in fake.requests[resumed:]}
    assert not again & kept  # nothing paid before the kill is paid again
    assert summary["arms"][1]["metrics"]["correct"]["n"] == len(models.references) - 1


# --- bad input ----------------------------------------------------------------------------------------


def test_a_bad_questions_line_is_one_error_naming_it_and_nothing_is_asked(
    ws: Path, fake: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "How do I rotate a key?", "gold_paths": ["guides/keys.md"]}\n'
        '{"question": "Is there a CLI?", "answerable": false}\n'
        '{"question": "What port?", "gold_paths": "guides/keys.md"}\n'
    )
    before = len(fake.requests)
    code, _, err = ftkit("eval", *MODELS, *PRODUCT, "--questions", str(path))
    assert code == 1
    assert err.strip().splitlines() == [
        f"Error: {path}:3: 'gold_paths' must be a list of paths or URLs — " + err.split(" — ", 1)[1].strip()
    ]
    assert len(fake.requests) == before and not (ws / "eval").exists()


def test_questions_file_measures_refusals_and_follow_ups(ws: Path, fake: FakeOpenAI, tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    lines = [
        {
            "id": "in",
            "question": "How do I rotate a key?",
            "reference": "Run quill keys rotate.",
            "gold_paths": ["a.md"],
        },
        {"id": "out", "question": "What is the weather on Mars?", "answerable": False},
        {
            "id": "next",
            "question": "And then?",
            "history": [
                {"role": "user", "text": "How do I start?"},
                {"role": "assistant", "text": "Install it."},
            ],
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    start = len(fake.requests)
    summary = eval_json("--questions", str(path), "--arms", "ft", "--name", "mine")
    assert summary["origins"] == {"mine.jsonl": 3}
    by_id = {r["question_id"]: r for r in results(ws, "mine")}
    # ft says "I don't know." to questions it has no reference for: right for "out", wrong for the others
    assert (
        by_id["out"]["scores"]["refusal_accuracy"] == 1.0 and by_id["in"]["scores"]["refusal_accuracy"] == 0.0
    )
    assert arm(summary, "ft")["metrics"]["refusal_accuracy"]["value"] == pytest.approx(1 / 3)
    follow_up = next(b for b in fake.requests[start:] if b["messages"][-1]["content"] == "And then?")
    assert [m["role"] for m in follow_up["messages"]] == ["system", "user", "assistant", "user"]
    assert "too wide to decide" in " ".join(summary["notes"])


def test_the_sample_docs_hand_written_set(ws: Path, models: EvalModels) -> None:
    path = REPO / "tests" / "fixtures" / "retrieval-questions.jsonl"
    questions = load_questions_file(path)
    unanswerable = [q for q in questions if not q.answerable]
    assert len(questions) == 45 and len(unanswerable) == 15
    assert all(q.gold_paths and q.reference for q in questions if q.answerable)
    models.extra = {q.question: q.reference or "" for q in questions if q.answerable}
    summary = eval_json("--questions", str(path), "--arms", "base,ft", "--name", "fixture")
    assert summary["origins"] == {"retrieval-questions.jsonl": 45}
    # ft answers what it knows and says "I don't know." to the rest: every refusal right
    assert arm(summary, "ft")["metrics"]["refusal_accuracy"]["value"] == 1.0
    # base answers every answerable one, and refuses (says nothing) only to the unanswerable ones it "knows"
    refused = sum(models.base_knows(q.question) for q in unanswerable)
    assert arm(summary, "base")["metrics"]["refusal_accuracy"]["value"] == pytest.approx((30 + refused) / 45)
    assert arm(summary, "ft")["metrics"]["correct"]["n"] == 30  # the judge grades answerable ones only
    assert summary["verdict"].startswith(
        "On 45 questions from retrieval-questions.jsonl, ft answered 100 % correctly"
    )
    assert not any("no unanswerable questions" in note for note in summary["notes"])


# --- the report ---------------------------------------------------------------------------------------


def test_report_files_are_written_and_self_contained(ws: Path, models: EvalModels) -> None:
    # held-out questions only: the count of disagreements below is over their references
    code, out, err = ftkit(
        "eval", *MODELS, *PRODUCT, "--arms", "base,ft", "--name", "r1", "--no-unanswerable"
    )
    assert code == 0, err
    run = ws / "eval" / "r1"
    assert {p.name for p in run.iterdir()} == {
        "report.html",
        "report.md",
        "results.jsonl",
        "chart.png",
        "summary.json",
    }
    assert (run / "chart.png").read_bytes().startswith(b"\x89PNG")
    page = (run / "report.html").read_text()
    assert (
        "data:image/png;base64," in page and "<script" not in page and "http" not in page.split("<body>")[0]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["verdict"] in page.replace("&#x27;", "'")
        and summary["verdict"] in (run / "report.md").read_text()
    )
    # the arms disagree where base is wrong; an unjudged question still differs in token F1
    assert page.count("<h3>") == min(10, sum(models.base_knows(q) is False for q in models.references))
    assert "Report: ws/eval/r1/report.html" in out
    assert re.search(r"[┃│] +ft +[┃│]", out) and "judge correct" in out  # the terminal's table


def test_the_terminal_table_has_an_arm_a_row_or_on_a_narrow_terminal_an_arm_a_column(ws: Path) -> None:
    eval_json("--arms", "base,ft", "--name", "t1")
    summary = load_summary(ws, "t1")

    def rendered(width: int) -> str:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(summary_table(summary, width=width))
        return console.export_text()

    wide, narrow = rendered(400), rendered(80)
    assert re.search(r"^┃ arm +┃ model +┃ +judge correct ┃", wide, re.M)
    assert re.search(r"^│ base +│ base-model +│", wide, re.M) and re.search(
        r"^│ ft +│ ft-model +│", wide, re.M
    )
    assert re.search(r"^┃ metric +┃ +base ┃ +ft ┃ *$", narrow, re.M)
    assert re.search(r"^│ model +│ +base-model │ +ft-model │ *$", narrow, re.M)
    assert max(len(line) for line in narrow.splitlines()) <= 80


def test_compare_shows_what_changed_between_two_runs(ws: Path) -> None:
    eval_json("--arms", "base", "--name", "before")
    eval_json("--arms", "base,ft", "--name", "after")
    code, out, err = ftkit("eval", "--compare", "before", "after")
    assert code == 0, err
    assert "before → after" in out
    assert re.search(r"ft\s+│ judge correct\s+│\s+–\s+│\s+100 %.*│\s+new", out), out
    code, _, err = ftkit("eval", "--compare", "before", "nope")
    assert code == 1 and "no such eval run" in err and "before" in err


# --- metrics, judge parsing ---------------------------------------------------------------------------


def test_verdict_parsing() -> None:
    assert parse_verdict("VERDICT: correct\nREASON: same facts.") == ("correct", "same facts.")
    assert parse_verdict("**Verdict:** Partly\nReason: misses the port") == ("partly", "misses the port")
    assert parse_verdict("verdict - incorrect") == ("incorrect", "")
    assert parse_verdict("The answer is correct.") is None
    assert parse_verdict("") is None


def test_claim_parsing() -> None:
    reply = "CLAIM: Run quill-flag create | SUPPORTED\n**Claim 2:** The port is 8080 | unsupported\nThanks!"
    assert parse_claims(reply) == [("Run quill-flag create", True), ("The port is 8080", False)]
    assert parse_claims("- claim: it needs 50 MB — NOT SUPPORTED") == [("it needs 50 MB", False)]
    assert parse_claims("NO CLAIMS") == []
    assert parse_claims("The answer looks grounded to me.") is None
    assert ClaimCheck([("a", True), ("b", False)]).score == 0.5
    assert ClaimCheck(unjudged=True).score is None and ClaimCheck([]).score is None


def test_judge_free_scores() -> None:
    assert token_f1("Run quill keys rotate", "Run `quill keys rotate` now.") == pytest.approx(
        2 * 1 * 0.8 / 1.8
    )
    assert token_f1("nothing alike", "Run quill keys rotate") == 0.0
    assert key_term_recall("set max_retries to 4", "Set max_retries to 4 in ftkit.toml") == pytest.approx(
        2 / 3
    )
    assert key_term_recall("anything", "a to be") is None


def test_retrieval_scores_and_the_sign_test() -> None:
    hits = [
        {"rank": i + 1, "path": p, "url": ""} for i, p in enumerate(["x.md", "gold.md", "gold.md", "y.md"])
    ]
    scores = retrieval_scores(hits, ("gold.md",), k=1)
    assert scores["recall_at_k"] == 0.0 and scores["mrr"] == 0.5
    assert scores["ndcg"] == pytest.approx(1 / 1.584962500721156)  # one gold document, found at rank 2
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(3, 3) == 1.0


def test_bootstrap_interval_holds_the_estimate_and_is_seeded() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.5, None, 0.0, 1.0]
    first, again = bootstrap(values, "correct"), bootstrap(values, "correct")
    assert first == again and first.n == 7
    assert first.low is not None and first.high is not None
    assert first.value == pytest.approx(4.5 / 7)
    assert first.low <= first.value <= first.high
    assert 0 <= first.low < first.high <= 1


@pytest.mark.slow
def test_eval_with_the_embedded_model(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "three.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": q, "reference": r}) + "\n"
            for q, r in [
                ("How do I install Quillstack?", "Run pip install quillstack."),
                ("What does quill init do?", "It creates a new project."),
                ("Where is the config file?", "In quill.toml at the project root."),
            ]
        )
    )
    started = time.monotonic()
    args = ["eval", "--arms", "base", "--questions", str(path), "--max-tokens", "48", "--json"]
    result = runner.invoke(app, ["--workspace", "ws", *args])
    print(f"eval of 3 questions with the embedded model: {time.monotonic() - started:.0f} s")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    base = arm(summary, "base")
    assert base["answers"] == 3 and base["errors"] == 0
    assert base["metrics"]["token_f1"]["n"] == 3
    assert (tmp_path / "ws" / "eval").is_dir()
