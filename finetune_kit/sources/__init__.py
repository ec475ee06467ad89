"""Corpus sources: each yields SourceDocuments (clean text + a URL a person can open) or SkippedFiles."""

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceDocument:
    """One document read from a source, already converted to Markdown-ish text."""

    path: str  # path inside the source, POSIX separators ("guide/install.md")
    source_url: str  # what a person opens: a permalink or a file:// URI
    text: str  # clean text; Markdown headings (#) mark structure
    format: str  # "markdown", "rst", "html", "text" or "code"


@dataclass(frozen=True)
class SkippedFile:
    """A file the source saw but could not use, with the reason a user can act on."""

    path: str
    reason: str


SourceItem = SourceDocument | SkippedFile
SourceIter = Iterator[SourceItem]
