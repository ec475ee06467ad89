"""Code chunks: their own question and answer templates, chosen per chunk, in live runs, batch runs and estimates."""

import json
import shutil
import string
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.llm.budget import prompt_tokens
from finetune_kit.llm.client import request_hash
from finetune_kit.pipeline import run_build_dataset, run_generate_questions, run_ingest
from finetune_kit.prompts import REQUIRED_PLACEHOLDERS, default_prompts_dir, load_prompt
from finetune_kit.stages.build_dataset import (
    answer_key,
    answer_request,
    judge_answer,
    load_answer_templates,
    planned_answer_requests,
)
from finetune_kit.stages.estimate import TYPICAL_QUESTION, estimate_generation, planning_endpoint
from finetune_kit.stages.generate_questions import (
    generation_key,
    load_question_templates,
    pending_chunks,
    question_request,
)
from finetune_kit.stages.questions import judge
from finetune_kit.status import workspace_status
from finetune_kit.store import Store
from tests.fake_openai import FakeOpenAI

CODE = '''\
def parse_port(value: str) -> int:
    """Turn a port setting such as "8080" into a number; raise ValueError outside 1-65535."""
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return port
'''
GUIDE = "# Ports\n\nQuillstack listens on port 8080 unless you set the port option in ftkit.toml.\n"
DOCS_ANSWER = "You are a helpful technical support agent for Quillstack. Answer the user's question using only the documentation below."
CODE_ANSWER = "You are a helpful technical support agent for Quillstack. Answer the user's question using only the source code below."


def placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def user_prompts(fake: FakeOpenAI) -> list[str]:
    return [body["messages"][-1]["content"] for body in fake.requests]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "guide.md").write_text(GUIDE)
    (folder / "ports.py").write_text(CODE)
    return folder


def code_settings(tmp_path: Path, **flags: object) -> Settings:
    # these tests count the answer prompts sent; the grounding judge's own calls are tested in test_grounding.py
    flags = {"grounding_judge": False, **flags}
    return load_settings(workspace=tmp_path / "ws", include_code=True, product="Quillstack", **flags)


def test_bundled_code_template_has_the_question_placeholders_and_asks_about_code() -> None:
    template = load_prompt("code_questions")

    assert template.path == default_prompts_dir() / "code_questions.txt"
    assert placeholders(template.text) == REQUIRED_PLACEHOLDERS["code_questions"] == {"product", "n", "chunk"}
    rendered = template.render(product="Acme", n=3, chunk="def f(): ...")
    assert rendered.startswith("Source code of Acme:\ndef f(): ...\n")
    assert rendered.endswith("Questions:\n1.")
    assert template.version != load_prompt("questions").version


def test_a_question_about_the_code_above_is_not_self_contained() -> None:
    assert judge("What does the code above return?", [], 0.85) == "echoes the prompt"
    assert judge("What does parse_port return for 8080?", [], 0.85) is None


def test_a_prompts_dir_without_a_code_template_uses_the_bundled_one(tmp_path: Path) -> None:
    (tmp_path / "questions.txt").write_text("Docs of {product}:\n{chunk}\n\nWrite {n} questions.\n")

    assert load_prompt("code_questions", tmp_path) == load_prompt("code_questions")
    assert load_prompt("questions", tmp_path).path == tmp_path / "questions.txt"


def test_a_custom_code_template_is_used_and_checked(tmp_path: Path) -> None:
    (tmp_path / "code_questions.txt").write_text("Code of {product}:\n{chunk}\n\nAsk {n} questions.\n")
    assert load_prompt("code_questions", tmp_path).render(product="A", n=2, chunk="x") == (
        "Code of A:\nx\n\nAsk 2 questions."
    )

    (tmp_path / "code_questions.txt").write_text("Code of {product}:\n{chunk}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_prompt("code_questions", tmp_path)
    assert str(excinfo.value) == (
        f"{tmp_path / 'code_questions.txt'}: missing placeholder {{n}} — the template must use ['chunk', 'n', 'product']"
    )


def test_code_chunks_get_the_code_template_and_docs_the_docs_template(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    settings = code_settings(tmp_path)
    run_ingest(settings, [str(corpus)])
    summary = run_generate_questions(settings)

    prompts = sorted(user_prompts(fake_llm))
    assert len(prompts) == 2
    assert prompts[0].startswith("Documentation of Quillstack:\n# Ports\n\nQuillstack listens on port 8080")
    assert prompts[1].startswith(
        "Source code of Quillstack:\n# ports.py > def parse_port\n\n```python\ndef parse_port("
    )
    assert summary.questions is not None and summary.questions.chunks_processed == 2
    templates, endpoint = load_question_templates(settings), planning_endpoint(settings)
    with Store(settings.db_path) as store:
        cached = {row[0] for row in store.db.execute("SELECT request_hash FROM llm_calls")}
        chunks = store.db.execute(
            "SELECT c.text, d.format FROM chunks c JOIN documents d ON d.id = c.document_id"
        )
        expected = {
            request_hash(endpoint, question_request(settings, templates.for_format(fmt), text, 0))
            for text, fmt in chunks
        }
    assert cached == expected  # each cache key holds its own template's version


def test_editing_the_code_template_re_asks_only_code_chunks(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    prompts = tmp_path / "prompts"
    shutil.copytree(default_prompts_dir(), prompts)
    settings = code_settings(tmp_path, prompts_dir=prompts)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)
    before = generation_key(settings, load_prompt("questions", prompts), "i", "m")
    sent = len(fake_llm.requests)

    code_template = prompts / "code_questions.txt"
    code_template.write_text(code_template.read_text().replace("Source code of", "The code of"))
    report = run_generate_questions(settings).questions

    assert generation_key(settings, load_prompt("questions", prompts), "i", "m") != before
    assert report is not None and (report.chunks_total, report.chunks_processed) == (2, 2)
    assert [prompt[:30] for prompt in user_prompts(fake_llm)[sent:]] == ["The code of Quillstack:\n# port"]


def test_dry_run_estimate_prices_each_chunk_with_its_own_template(tmp_path: Path, corpus: Path) -> None:
    settings = code_settings(tmp_path, model="gpt-4o-mini")
    run_ingest(settings, [str(corpus)])
    templates = load_question_templates(settings)
    with Store(settings.db_path) as store:
        [estimate] = estimate_generation(store, settings, answers=False)
        endpoint = planning_endpoint(settings)
        chunks = pending_chunks(
            store, generation_key(settings, templates.docs, endpoint.identity, endpoint.model)
        )

    assert sorted(chunk["format"] for chunk in chunks) == ["code", "markdown"]
    right = [question_request(settings, templates.for_format(c["format"]), c["text"], 0) for c in chunks]
    docs_only = [question_request(settings, templates.docs, c["text"], 0) for c in chunks]
    assert estimate.calls == 2
    assert (
        estimate.prompt_tokens
        == sum(prompt_tokens(r) for r in right)
        != sum(prompt_tokens(r) for r in docs_only)
    )


def test_batch_prefill_sends_code_chunks_with_the_code_template(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_BATCH_POLL_INTERVAL_S", "0.01")
    settings = code_settings(tmp_path, model="gpt-4o-mini", batch=True)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)

    assert fake_llm.requests == []  # every completion came through the Batch API
    [upload] = [f for f in fake_llm.batch_api.files.values() if f.purpose == "batch"]
    lines = [json.loads(line) for line in upload.data.decode().splitlines()]
    prompts = sorted(line["body"]["messages"][-1]["content"] for line in lines)
    assert [prompt.split("\n", 1)[0] for prompt in prompts] == [
        "Documentation of Quillstack:",
        "Source code of Quillstack:",
    ]


def openings(prompts: list[str]) -> list[str]:
    """The sorted first two sentences of the answer prompts among `prompts`, which name the template used."""
    return sorted(p.split(" below. ", 1)[0] + " below." for p in prompts if "\nQuestion: " in p)


def stored_answer_keys(settings: Settings) -> dict[str, set[str]]:
    """The answer keys in the workspace, by the format of the answered chunk's document."""
    keys: dict[str, set[str]] = {}
    with Store(settings.db_path) as store:
        for fmt, key in store.db.execute(
            "SELECT d.format, a.answer_key FROM answers a JOIN questions q ON q.id = a.question_id"
            " JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id"
        ):
            keys.setdefault(fmt, set()).add(key)
    return keys


def test_bundled_code_answers_template_mirrors_the_answers_template() -> None:
    docs, code = load_prompt("answers"), load_prompt("code_answers")

    assert code.path == default_prompts_dir() / "code_answers.txt"
    assert (
        placeholders(code.text) == REQUIRED_PLACEHOLDERS["code_answers"] == REQUIRED_PLACEHOLDERS["answers"]
    )
    assert code.text.endswith("\n{chunk}\n\nQuestion: {question}\nAnswer:\n")
    assert docs.text.endswith("\n{chunk}\n\nQuestion: {question}\nAnswer:\n")
    rendered = code.render(product="Quillstack", chunk="def parse_port(value): ...", question="Q?")
    assert rendered.startswith(CODE_ANSWER + " Name the function or class")
    assert "\n\nSource code:\ndef parse_port(value): ...\n\nQuestion: Q?\nAnswer:" in rendered
    assert code.version != docs.version


def test_a_prompts_dir_without_a_code_answers_template_uses_the_bundled_one(tmp_path: Path) -> None:
    (tmp_path / "answers.txt").write_text("Docs of {product}:\n{chunk}\n\nQuestion: {question}\nAnswer:\n")
    templates = load_answer_templates(code_settings(tmp_path, prompts_dir=tmp_path))

    assert templates.docs.path == tmp_path / "answers.txt"
    assert templates.code == load_prompt("code_answers")
    assert templates.for_format("code") == templates.code
    assert templates.for_format("markdown") == templates.for_format("html") == templates.docs


def test_a_custom_code_answers_template_is_used_and_checked(tmp_path: Path) -> None:
    (tmp_path / "code_answers.txt").write_text("Code of {product}:\n{chunk}\n\nQ: {question}\nA:\n")
    assert load_prompt("code_answers", tmp_path).render(product="A", chunk="x", question="y?") == (
        "Code of A:\nx\n\nQ: y?\nA:"
    )

    (tmp_path / "code_answers.txt").write_text("Code of {product}:\n{chunk}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_prompt("code_answers", tmp_path)
    assert str(excinfo.value) == (
        f"{tmp_path / 'code_answers.txt'}: missing placeholder {{question}}"
        " — the template must use ['chunk', 'product', 'question']"
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("The code does not mention a timeout.", "refusal or non-answer"),
        ("A retry limit is not specified in the code.", "refusal or non-answer"),
        ("`parse_port` returns the port as an int and raises ValueError outside 1-65535.", None),
    ],
)
def test_a_code_answer_that_says_the_code_lacks_it_is_rejected(answer: str, reason: str | None) -> None:
    assert judge_answer(answer, "stop") == reason


def test_code_chunks_are_answered_with_the_code_template_and_docs_with_the_docs_template(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    settings = code_settings(tmp_path)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)
    summary = run_build_dataset(settings)

    assert openings(user_prompts(fake_llm)) == [DOCS_ANSWER] * 3 + [CODE_ANSWER] * 3
    assert summary.dataset is not None and summary.dataset.answers_accepted == 6
    assert workspace_status(settings).answers == {"accepted": 6}
    endpoint = planning_endpoint(settings)
    docs, code = load_prompt("answers"), load_prompt("code_answers")
    assert stored_answer_keys(settings) == {
        # the docs key is made exactly as before code answers had a template of their own
        "markdown": {answer_key(settings, docs, endpoint.identity, endpoint.model)},
        "code": {answer_key(settings, code, endpoint.identity, endpoint.model)},
    }
    templates = load_answer_templates(settings)
    with Store(settings.db_path) as store:
        cached = {
            row[0]
            for row in store.db.execute("SELECT request_hash FROM llm_calls WHERE stage = 'build-dataset'")
        }
        rows = store.db.execute(
            "SELECT c.text, d.format, q.text FROM questions q JOIN chunks c ON c.id = q.chunk_id"
            " JOIN documents d ON d.id = c.document_id WHERE q.status = 'accepted'"
        )
        expected = {
            request_hash(endpoint, answer_request(settings, templates.for_format(fmt), chunk, question))
            for chunk, fmt, question in rows
        }
    assert cached == expected  # each cache key holds its own template's version


def test_editing_the_code_answers_template_re_asks_only_code_answers(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    prompts = tmp_path / "prompts"
    shutil.copytree(default_prompts_dir(), prompts)
    settings = code_settings(tmp_path, prompts_dir=prompts)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)
    run_build_dataset(settings)
    docs_keys, sent = stored_answer_keys(settings)["markdown"], len(fake_llm.requests)

    code_template = prompts / "code_answers.txt"
    code_template.write_text(code_template.read_text().replace("only the source code", "only the code"))
    summary = run_build_dataset(settings)

    assert openings(user_prompts(fake_llm)[sent:]) == [CODE_ANSWER.replace("source code", "code")] * 3
    assert summary.dataset is not None and summary.dataset.answered == 3
    assert stored_answer_keys(settings)["markdown"] == docs_keys
    assert len(stored_answer_keys(settings)["code"]) == 2
    assert summary.dataset.train is not None and summary.dataset.validation is not None
    assert summary.dataset.train.examples + summary.dataset.validation.examples == 6
    sent = len(fake_llm.requests)

    run_build_dataset(settings)
    assert len(fake_llm.requests) == sent  # a re-run makes no calls


def test_a_workspace_answered_before_code_answers_re_asks_only_code_chunks(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    # A code answers template identical to answers.txt answers the way ftkit did before it had one.
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("questions", "code_questions", "answers"):
        shutil.copy(default_prompts_dir() / f"{name}.txt", prompts)
    shutil.copy(prompts / "answers.txt", prompts / "code_answers.txt")
    settings = code_settings(tmp_path, prompts_dir=prompts)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)
    run_build_dataset(settings)
    assert openings(user_prompts(fake_llm)) == [DOCS_ANSWER] * 6
    sent = len(fake_llm.requests)

    (prompts / "code_answers.txt").unlink()  # the prompts_dir of a workspace made before code_answers.txt
    run_build_dataset(settings)

    assert openings(user_prompts(fake_llm)[sent:]) == [CODE_ANSWER] * 3


def test_dry_run_estimate_prices_each_answer_with_its_own_template(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI
) -> None:
    settings = code_settings(tmp_path, model="gpt-4o-mini")
    run_ingest(settings, [str(corpus)])
    endpoint, templates = planning_endpoint(settings), load_answer_templates(settings)
    with Store(settings.db_path) as store:
        [_, future] = estimate_generation(store, settings)  # before any question exists: extrapolated
        chunks = store.db.execute(
            "SELECT c.text, d.format FROM chunks c JOIN documents d ON d.id = c.document_id"
        ).fetchall()
    typical = [
        answer_request(settings, templates.for_format(fmt), text, TYPICAL_QUESTION) for text, fmt in chunks
    ]
    assert future.extrapolated and future.calls == 6
    assert future.prompt_tokens == 3 * sum(prompt_tokens(r) for r in typical)

    run_generate_questions(settings)
    with Store(settings.db_path) as store:
        [planned] = estimate_generation(store, settings, questions=False)
        requests = planned_answer_requests(store, settings, endpoint.identity, endpoint.model)
    assert openings([r.messages[-1][1] for r in requests]) == [DOCS_ANSWER] * 3 + [CODE_ANSWER] * 3
    assert (planned.calls, planned.prompt_tokens) == (6, sum(prompt_tokens(r) for r in requests))


def test_batch_prefill_sends_code_answers_with_the_code_template(
    tmp_path: Path, corpus: Path, fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTKIT_BATCH_POLL_INTERVAL_S", "0.01")
    settings = code_settings(tmp_path, model="gpt-4o-mini", batch=True)
    run_ingest(settings, [str(corpus)])
    run_generate_questions(settings)
    run_build_dataset(settings)

    assert fake_llm.requests == []  # every completion came through the Batch API
    uploads = [f for f in fake_llm.batch_api.files.values() if f.purpose == "batch"]
    lines = [json.loads(line) for upload in uploads for line in upload.data.decode().splitlines()]
    prompts = [line["body"]["messages"][-1]["content"] for line in lines]
    assert openings(prompts) == [DOCS_ANSWER] * 3 + [CODE_ANSWER] * 3
