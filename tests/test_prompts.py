import hashlib
import re
import string
from pathlib import Path

import pytest

from finetune_kit.errors import ConfigError
from finetune_kit.prompts import REQUIRED_PLACEHOLDERS, PromptTemplate, default_prompts_dir, load_prompt

VALID = {
    "questions": "Docs of {product}:\n{chunk}\n\nWrite {n} questions.\n",
    "answers": "Docs of {product}:\n{chunk}\n\nQuestion: {question}\nAnswer:\n",
}


def placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def prompts_dir_with(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", ["questions", "answers"])
def test_bundled_template_loads_with_required_placeholders(name: str) -> None:
    template = load_prompt(name)

    assert template.name == name
    assert template.path == default_prompts_dir() / f"{name}.txt"
    assert template.text == template.path.read_text(encoding="utf-8")
    assert placeholders(template.text) == REQUIRED_PLACEHOLDERS[name]


@pytest.mark.parametrize("name", ["questions", "answers"])
def test_bundled_template_renders_every_placeholder(name: str) -> None:
    values = {"product": "Acme", "n": 3, "chunk": "Acme listens on port 8080.", "question": "Which port?"}

    rendered = load_prompt(name).render(**{k: values[k] for k in REQUIRED_PLACEHOLDERS[name]})

    assert "Acme listens on port 8080." in rendered
    assert "{" not in rendered
    assert rendered == rendered.strip()


@pytest.mark.parametrize("name", ["questions", "answers"])
def test_version_is_a_hash_of_the_text(name: str) -> None:
    template = load_prompt(name)

    assert re.fullmatch(r"p1:[0-9a-f]{12}", template.version)
    assert template.version == "p1:" + hashlib.sha256(template.text.encode()).hexdigest()[:12]
    assert load_prompt(name).version == template.version


def test_version_is_stable_for_the_same_text_anywhere(tmp_path: Path) -> None:
    folder = prompts_dir_with(tmp_path, "answers", VALID["answers"])

    assert (
        load_prompt("answers", folder).version
        == "p1:" + hashlib.sha256(VALID["answers"].encode()).hexdigest()[:12]
    )
    assert (
        PromptTemplate("answers", VALID["answers"], Path("elsewhere.txt")).version
        == load_prompt("answers", folder).version
    )


def test_version_changes_when_text_changes(tmp_path: Path) -> None:
    folder = prompts_dir_with(tmp_path, "answers", VALID["answers"])
    before = load_prompt("answers", folder).version

    (folder / "answers.txt").write_text(VALID["answers"] + "Be brief.\n", encoding="utf-8")

    assert load_prompt("answers", folder).version != before


def test_render_leaves_braces_inside_values_alone() -> None:
    template = PromptTemplate("answers", "{product}|{chunk}|{question}|{{literal}}\n", Path("answers.txt"))

    rendered = template.render(product="A{c}", chunk='config = {"port": {port}}', question="What is {}?")

    assert rendered == 'A{c}|config = {"port": {port}}|What is {}?|{literal}'


def test_custom_prompts_dir_is_used(tmp_path: Path) -> None:
    folder = prompts_dir_with(tmp_path, "questions", VALID["questions"])

    template = load_prompt("questions", folder)

    assert template == PromptTemplate("questions", VALID["questions"], folder / "questions.txt")
    assert (
        template.render(product="Acme", chunk="Port 8080.", n=2)
        == "Docs of Acme:\nPort 8080.\n\nWrite 2 questions."
    )


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        (
            "questions",
            "{product} {chunk}",
            "missing placeholder {n} — the template must use ['chunk', 'n', 'product']",
        ),
        (
            "answers",
            "{product} {question}",
            "missing placeholder {chunk} — the template must use ['chunk', 'product', 'question']",
        ),
        (
            "questions",
            "{product} {chunk} {n} {topic}",
            "unknown placeholder {topic} — use only ['chunk', 'n', 'product']",
        ),
        (
            "answers",
            "{product} {chunk} {question} {0}",
            "unknown placeholder {0} — use only ['chunk', 'product', 'question']",
        ),
        (
            "answers",
            "{product} {chunk} {question} {}",
            "unknown placeholder {} — use only ['chunk', 'product', 'question']",
        ),
        (
            "answers",
            "{product} {chunk} {question} {chunk.upper}",
            "unknown placeholder {chunk.upper} — use only ['chunk', 'product', 'question']",
        ),
        (
            "answers",
            '{product} {chunk} {question} Reply as {"answer": "..."}',
            "unknown placeholder {\"answer\"} — use only ['chunk', 'product', 'question']",
        ),
        (
            "answers",
            "{product} {chunk {question}",
            "unexpected '{' in field name — write literal braces as {{ and }}",
        ),
        (
            "answers",
            "{product} {chunk} {question} }",
            "Single '}' encountered in format string — write literal braces as {{ and }}",
        ),
        (
            "answers",
            "{product} {chunk} {question} {",
            "Single '{' encountered in format string — write literal braces as {{ and }}",
        ),
    ],
)
def test_bad_custom_template_gives_exact_message(tmp_path: Path, name: str, text: str, problem: str) -> None:
    folder = prompts_dir_with(tmp_path, name, text)

    with pytest.raises(ConfigError) as excinfo:
        load_prompt(name, folder)

    assert str(excinfo.value) == f"{folder / (name + '.txt')}: {problem}"


def test_missing_template_file_gives_exact_message(tmp_path: Path) -> None:
    folder = prompts_dir_with(tmp_path, "questions", VALID["questions"])

    with pytest.raises(ConfigError) as excinfo:
        load_prompt("answers", folder)

    assert str(excinfo.value) == (
        f"{folder / 'answers.txt'}: cannot read prompt template (No such file or directory) — check prompts_dir"
    )
