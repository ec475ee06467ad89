"""How library code reports progress without printing: the CLI passes a reporter that draws bars."""

from typing import Protocol


class Progress(Protocol):
    """Receives stage progress; the CLI draws bars from it, tests and library callers ignore it."""

    def start(self, stage: str, total: int) -> None:
        """A stage begins with `total` units of work."""

    def advance(self, n: int = 1) -> None:
        """`n` more units are done."""

    def grow(self, n: int) -> None:
        """`n` more units of work were found for the current stage (its questions arrive while it runs)."""

    def finish(self) -> None:
        """The current stage is over."""

    def beside(self) -> "Progress":
        """A reporter of its own for a stage that runs at the same time as this one (its own bar)."""

    def note(self, line: str) -> None:
        """A line to say before the work goes on (a stage about to make again work the workspace holds)."""


class NoProgress:
    """A Progress that reports nothing."""

    def start(self, stage: str, total: int) -> None:
        """Ignore the start."""

    def advance(self, n: int = 1) -> None:
        """Ignore progress."""

    def grow(self, n: int) -> None:
        """Ignore the growth."""

    def finish(self) -> None:
        """Ignore the end."""

    def beside(self) -> "NoProgress":
        """Another reporter that reports nothing."""
        return NoProgress()

    def note(self, line: str) -> None:
        """Ignore the line (the library logs it)."""
