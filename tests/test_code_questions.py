"""Questions about code: their own template, chosen per chunk, in live runs, batch runs and dry-run estimates."""

import json
import shutil
import string
from pathlib import Path

import pytest

from finetune_kit.config import Settings, load_settings
from finetune_kit.errors import ConfigError
from finetune_kit.estimate import estimate_generation, planning_endpoint
from finetune_kit.llm.budget import prompt_tokens
from finetune_kit.llm.client import request_hash
from finetune_kit.pipeline import run_generate_questions, run_ingest
from finetune_kit.prompts import REQUIRED_PLACEHOLDERS, default_prompts_dir, load_prompt
from finetune_kit.questions import judge
from finetune_kit.stages.generate_questions import (
    generation_key,
    load_question_templates,
    pending_chunks,
    question_request,
)
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
