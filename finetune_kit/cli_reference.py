"""The README's CLI reference, generated from the commands' own `--help` so that it cannot drift.

Regenerate with `python -m finetune_kit.cli_reference --write README.md`; `--check` fails on a difference.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import typer

BEGIN = "<!-- cli-reference: generated from --help by `python -m finetune_kit.cli_reference --write README.md` -->"
END = "<!-- /cli-reference -->"
WIDTH = 100


def commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every command by its full name ("train", "train watch"), in the order `--help` lists them."""
    found: list[tuple[str, Any]] = []
    for name, command in group.commands.items():
        found.append((prefix + name, command))
        if hasattr(command, "commands"):
            found += commands(command, prefix + name + " ")
    return found


def help_text(name: str, command: Any) -> str:
    """What `NAME --help` prints, at a fixed width."""
    ctx = command.context_class(command, info_name=name, terminal_width=WIDTH, max_content_width=WIDTH)
    return command.get_help(ctx).rstrip()


def render(group: Any) -> str:
    """The reference for a Click group (`typer.main.get_command(app)`): its help, then each command's."""
    sections = [f"### `ftkit`\n\n```text\n{help_text('ftkit', group)}\n```"]
    for name, command in commands(group):
        sections.append(f"### `ftkit {name}`\n\n```text\n{help_text('ftkit ' + name, command)}\n```")
    return "\n\n".join(sections)


def updated(readme: str, reference: str) -> str:
    """`readme` with the text between the reference markers replaced by `reference`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no '{BEGIN}' … '{END}' block")
    return readme[: start + len(BEGIN)] + "\n\n" + reference + "\n\n" + readme[end:]


def main() -> None:
    """Write or check the reference block of a README."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("readme", type=Path)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the block in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if the block is out of date")
    args = parser.parse_args()
    from finetune_kit.cli import app

    text = args.readme.read_text()
    new = updated(text, render(typer.main.get_command(app)))
    if args.write:
        args.readme.write_text(new)
    elif new != text:
        sys.exit(
            f"{args.readme}: the CLI reference is out of date — run python -m finetune_kit.cli_reference --write {args.readme}"
        )


if __name__ == "__main__":
    main()
