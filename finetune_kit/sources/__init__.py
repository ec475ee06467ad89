"""Corpus sources: each yields SourceDocuments (clean text + a URL a person can open) or SkippedFiles.

Every kind of source (a folder or file, a git repository, a website, a Slack export, an Airtable table)
implements `SourceKind`; `sources/registry.py` finds the kind a corpus argument names.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from finetune_kit.config import Settings
from finetune_kit.store import Store


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


@dataclass(frozen=True)
class SourceIdentity:
    """What names a source across runs: its kind (the `sources.kind` column) and a key however the spec is spelt."""

    kind: str
    key: str

    @property
    def id(self) -> str:
        """The source's stable id: its documents and chunks hang off it."""
        return "s1:" + hashlib.sha256(f"{self.kind}\0{self.key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReadContext:
    """What a source may use while reading: the settings, and the state DB under its own id (a site's memory)."""

    settings: Settings
    store: Store
    source_id: str


@runtime_checkable
class SourceKind(Protocol):
    """One kind of corpus source: does a spec name it, what names it across runs, and its documents."""

    name: str  # the registry's name for the kind ("git"); `register(..., before=name)` places a new kind

    def claims(self, spec: str) -> bool:
        """Say whether the corpus argument `spec` names a source of this kind."""
        ...

    def identity(self, spec: str) -> SourceIdentity:
        """The source's kind and stable key; a malformed spec raises SourceError naming the fix."""
        ...

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """Every document of the source, and every file it skipped with the reason."""
        ...


def path_key(spec: str) -> str:
    """A local path as one absolute name, however it is spelt (`~/docs`, `./docs/`)."""
    return str(Path(spec).expanduser().resolve())


def url_or_path_key(spec: str) -> str:
    """A URL as given; a spec that exists on disk as its absolute path."""
    return path_key(spec) if Path(spec).exists() else spec
