"""The staged pipeline end to end through the CLI, against a fake OpenAI endpoint over real HTTP."""

import hashlib
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.config import load_settings
from finetune_kit.pipeline import run_all
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder


def ftkit(runner: CliRunner, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--workspace", "ws", *args])
    return result.exit_code, result.stdout, result.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_a_validated_dataset_and_rerun_makes_no_calls(
    runner: CliRunner, fake_llm: FakeOpenAI
) -> None:
    code, out, err = ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")
    assert code == 0, err
    train = read_jsonl(Path("ws/dataset/train.jsonl"))
    validation = read_jsonl(Path("ws/dataset/validation.jsonl"))
    assert len(train) >= 10 and validation
    assert {m["role"] for m in train[0]["messages"]} == {"system", "user", "assistant"}
    assert "Wrote ws/dataset/train.jsonl" in out
    assert fake_llm.invalid_requests == []
    calls = len(fake_llm.requests)

    code, out, err = ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")
    assert code == 0, err
    assert len(fake_llm.requests) == calls  # zero new LLM calls
    assert read_jsonl(Path("ws/dataset/train.jsonl")) == train


def unique_questions(body: dict) -> Reply:
    """Questions that name their chunk, so a dataset line can be traced back to it."""
    prompt = body["messages"][-1]["content"]
    if "Questions:" not in prompt:
        return docs_responder(body)
    tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return Reply("\n".join(f"{i}. What is fact {i} of section {tag} in Quillstack?" for i in (1, 2, 3)))


def test_no_validation_chunk_leaks_into_training(runner: CliRunner, monkeypatch) -> None:
    with FakeOpenAI(unique_questions, api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        assert ftkit(runner, "run", str(SAMPLE_DOCS), "--seed", "7")[0] == 0
    tag = re.compile(r"section (\w+) in")
    train = {tag.search(r["messages"][1]["content"])[1] for r in read_jsonl(Path("ws/dataset/train.jsonl"))}
    held = {
        tag.search(r["messages"][1]["content"])[1] for r in read_jsonl(Path("ws/dataset/validation.jsonl"))
    }
    assert train and held and not (train & held)


def test_stages_run_alone_and_editing_one_document_reruns_only_its_chunks(
    runner: CliRunner, fake_llm: FakeOpenAI, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, docs)
    assert ftkit(runner, "ingest", str(docs))[0] == 0
    assert ftkit(runner, "generate-questions", "--product", "Quillstack")[0] == 0
    assert ftkit(runner, "build-dataset", "--product", "Quillstack")[0] == 0
    calls = len(fake_llm.requests)
    faq = docs / "faq.md"
    faq.write_text(
        faq.read_text() + "\n\n## Does Quillstack run on ARM?\n\nYes. Every release ships arm64 builds.\n"
    )

    code, out, _ = ftkit(runner, "ingest", str(docs))
    assert code == 0
    assert "1 new documents" in out and "1 retired" in out
    assert ftkit(runner, "generate-questions", "--product", "Quillstack")[0] == 0
    assert ftkit(runner, "build-dataset", "--product", "Quillstack")[0] == 0
    new_prompts = [r["messages"][0]["content"] for r in fake_llm.requests[calls:]]
    assert new_prompts
    assert all("arm64" in prompt for prompt in new_prompts)  # only chunks holding the edit were re-asked


def test_prompt_completion_format(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    code, _, err = ftkit(
        runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack", "--format", "prompt-completion"
    )
    assert code == 0, err
    record = read_jsonl(Path("ws/dataset/train.jsonl"))[0]
    assert set(record) == {"prompt", "completion"}
    assert record["prompt"].endswith("\n\n###\n\n")
    assert record["completion"].startswith(" ") and record["completion"].endswith(" END")


def test_status_reports_coverage_and_ledger(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    assert ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")[0] == 0
    code, out, _ = ftkit(runner, "status", "--product", "Quillstack")
    assert code == 0
    assert (
        "chunks not yet processed" in out and "LLM generate-questions" in out and "LLM build-dataset" in out
    )


def test_garbage_model_fails_with_one_line_and_keeps_state(
    runner: CliRunner, tmp_path: Path, monkeypatch
) -> None:
    with FakeOpenAI(lambda body: Reply("lorem ipsum dolor sit amet"), api_key=TEST_KEY) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
        monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
        code, _, err = ftkit(runner, "run", str(SAMPLE_DOCS))
    assert code == 1
    assert err.startswith("Error: model 'gpt-4o-mini' produced no usable questions for any of ")
    assert len(err.strip().splitlines()) == 1
    db = sqlite3.connect("ws/state.db")
    reasons = {r[0] for r in db.execute("SELECT reason FROM question_sets")}
    assert reasons == {"every candidate rejected (mostly: not a question (no question mark))"}


def test_unreachable_endpoint_is_one_line(runner: CliRunner, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("FTKIT_MAX_RETRIES", "0")
    code, _, err = ftkit(runner, "run", str(SAMPLE_DOCS))
    assert code == 1
    assert err == (
        "Error: cannot reach the LLM endpoint http://127.0.0.1:9/v1 after 1 try — check OPENAI_BASE_URL and that"
        " the server is up, then re-run (finished work is kept)\n"
    )


def test_openai_provider_without_key(runner: CliRunner) -> None:
    code, _, err = ftkit(runner, "generate-questions", "--provider", "openai")
    assert code == 1
    assert err == (
        "Error: provider 'openai' needs an API key — export OPENAI_API_KEY, or use --provider local for the embedded"
        " model\n"
    )


def test_wrong_key_is_reported_without_the_key(runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-value")
    code, out, err = ftkit(runner, "run", str(SAMPLE_DOCS))
    assert code == 1
    assert err == f"Error: {fake_llm.url} rejected the API key (401) — check OPENAI_API_KEY\n"
    assert "sk-wrong-secret-value" not in out + err
    assert b"sk-wrong-secret-value" not in Path("ws/state.db").read_bytes()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "Error: {p}/missing: no such file or directory — check the path\n"),
        (
            lambda p: p / "empty",
            "Error: {p}/empty: no documents found — point ftkit at a folder of .md/.mdx/.rst/.html/.txt files or widen --include\n",
        ),
    ],
)
def test_bad_corpus_paths(runner: CliRunner, tmp_path: Path, make, expected: str) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = ftkit(runner, "ingest", str(make(tmp_path)))
    assert code == 1
    assert err == expected.format(p=tmp_path)


def test_corpus_of_only_unusable_files(runner: CliRunner, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "logo.md").write_bytes(b"\x89PNG\x00\x00binary")
    (docs / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "notes.xyz").write_text("not a docs format, ignored")
    code, _, err = ftkit(runner, "ingest", str(docs))
    assert code == 1
    assert err == (
        f"Error: {docs}: no usable documents (2 files skipped: 1 not valid UTF-8 text, 1 binary file)"
        " — check --include/--exclude\n"
    )


def test_debug_shows_traceback(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "--workspace", "ws", "ingest", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "SourceError" in result.stderr


def test_flags_reach_the_settings(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    args = [
        "run",
        str(SAMPLE_DOCS),
        "-n",
        "2",
        "--chunk-tokens",
        "200",
        "--min-examples",
        "5",
        "--epochs",
        "2",
    ]
    code, out, err = ftkit(runner, *args)
    assert code == 0, err
    db = sqlite3.connect("ws/state.db")
    assert db.execute("SELECT max(n_tokens) FROM chunks").fetchone()[0] <= 200
    assert {n for (n,) in db.execute("SELECT n_accepted FROM question_sets")} == {2}
    assert "Estimated training: " in out and " tokens, $" in out


def test_run_goes_on_to_fine_tune_and_registers_the_model(
    runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_TRAIN_AFTER_DATASET", "true")  # the default, which conftest turns off
    monkeypatch.setenv("FTKIT_TRAINING_POLL_INTERVAL_S", "0.001")
    monkeypatch.setenv("FTKIT_TRAINING_MAX_POLL_INTERVAL_S", "0.01")
    code, out, err = ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack", "--out", "data-out")
    assert code == 0, err
    [job] = fake_llm.fine_tuning.jobs.values()
    assert "Wrote data-out/train.jsonl" in out
    assert f"Job {job.id} succeeded." in out
    assert f"Fine-tuned model: {job.fine_tuned_model} (registered; `ftkit models` lists it)" in out
    assert re.search(r"Trained tokens: [\d,]+ \(estimated cost \$\d+\.\d\d\)", out)
    uploaded = [f.data for f in fake_llm.batch_api.files.values() if f.purpose == "fine-tune"]
    assert Path("data-out/train.jsonl").read_bytes() in uploaded

    code, out, _ = ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack", "--no-train")
    assert code == 0 and "Job " not in out
    assert len(fake_llm.fine_tuning.jobs) == 1


def request_kind(body: dict) -> str:
    """Which stage a request to the fake belongs to, read from its prompt."""
    prompt = body["messages"][-1]["content"]
    if "\nQuestions:\n1." in prompt:
        return "question"
    return "answer" if "\nQuestion: " in prompt and prompt.rstrip().endswith("Answer:") else "other"


def built_dataset(workspace: str) -> dict[str, str]:
    return {name: Path(f"{workspace}/dataset/{name}.jsonl").read_text() for name in ("train", "validation")}


def test_run_asks_a_chunks_answers_while_other_chunks_wait_for_questions(
    runner: CliRunner, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_MAX_CONCURRENCY", "2")  # a small window: most chunks wait their turn
    assert ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")[0] == 0
    kinds = [request_kind(body) for body in fake_llm.requests]
    last_question = max(i for i, kind in enumerate(kinds) if kind == "question")
    assert kinds.index("answer") < last_question  # answers did not wait for every chunk's questions
    overlapped, sent = built_dataset("ws"), sorted(map(json.dumps, fake_llm.requests))

    stages = [["ingest", str(SAMPLE_DOCS)], ["generate-questions"], ["build-dataset"]]
    for args in stages:  # the same work stage by stage: every question before any answer
        result = runner.invoke(
            app, ["--workspace", "staged", *args, *(["--product", "Quillstack"] * (args[0] != "ingest"))]
        )
        assert result.exit_code == 0, result.stderr
    assert built_dataset("staged") == overlapped
    assert sorted(map(json.dumps, fake_llm.requests[len(sent) :])) == sent  # the same requests, each once


def test_run_answers_the_questions_an_earlier_command_stored(runner: CliRunner, fake_llm: FakeOpenAI) -> None:
    assert ftkit(runner, "ingest", str(SAMPLE_DOCS))[0] == 0
    assert ftkit(runner, "generate-questions", "--product", "Quillstack")[0] == 0
    asked = len(fake_llm.requests)
    assert ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")[0] == 0
    kinds = {request_kind(body) for body in fake_llm.requests[asked:]}
    assert "question" not in kinds and "answer" in kinds
    answered = len(fake_llm.requests)
    assert ftkit(runner, "run", str(SAMPLE_DOCS), "--product", "Quillstack")[0] == 0
    assert len(fake_llm.requests) == answered  # nothing left to ask: zero calls
    with sqlite3.connect("ws/state.db") as db:
        unanswered = db.execute(
            "SELECT count(*) FROM questions q WHERE q.status = 'accepted'"
            " AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.question_id = q.id)"
        ).fetchone()[0]
    assert unanswered == 0


class RecordedProgress:
    """A Progress that writes every call, with the bar it is about, into one shared log."""

    def __init__(self, log: list[tuple[str, str, int]]) -> None:
        self.log, self.stage = log, ""

    def start(self, stage: str, total: int) -> None:
        self.stage = stage
        self.log.append(("start", stage, total))

    def advance(self, n: int = 1) -> None:
        self.log.append(("advance", self.stage, n))

    def grow(self, n: int) -> None:
        self.log.append(("grow", self.stage, n))

    def finish(self) -> None:
        self.log.append(("finish", self.stage, 0))

    def note(self, line: str) -> None:
        pass

    def beside(self) -> "RecordedProgress":
        return RecordedProgress(self.log)


def test_run_moves_a_questions_bar_and_an_answers_bar_together(fake_llm: FakeOpenAI) -> None:
    settings = load_settings(workspace=Path("ws"), product="Quillstack", max_concurrency=2)
    log: list[tuple[str, str, int]] = []
    summary = run_all(settings, [str(SAMPLE_DOCS)], RecordedProgress(log))
    assert summary.questions is not None and summary.dataset is not None
    done = {stage: sum(n for call, s, n in log if call == "advance" and s == stage) for _, stage, _ in log}
    total = {
        stage: sum(n for call, s, n in log if call in ("start", "grow") and s == stage) for _, stage, _ in log
    }
    asked, answered = "generate questions", "answer questions"
    assert done[asked] == total[asked] > 0
    assert done[answered] == total[answered] == summary.dataset.answered > 0
    advances = [stage for call, stage, _ in log if call == "advance"]
    assert advances.index(answered) < len(advances) - 1 - advances[::-1].index(
        asked
    )  # both bars moved at once
