"""The source registry: which kind of source a corpus argument names, asked in order of precedence.

Adding a source kind is one new file and one line: write `finetune_kit/sources/<kind>.py` with a class that
implements `SourceKind` (finetune_kit/sources/__init__.py), and add it to `BUILT_IN` below at its place in the
order. Code outside ftkit (a plugin, a test) calls `register` instead.
"""

import importlib

from finetune_kit.errors import SourceError
from finetune_kit.sources import SourceKind

BUILT_IN = (  # "module:class"; the first kind that claims a spec reads it
    "finetune_kit.sources.airtable:AirtableSource",  # airtable:BASE_ID/TABLE
    "finetune_kit.sources.git:GitSource",  # ssh://, git://, git@host:, GitHub/GitLab/Bitbucket, *.git, a local repo
    "finetune_kit.sources.website:WebsiteSource",  # any other http(s) URL: a sitemap or a start page
    "finetune_kit.sources.slack_export:SlackExportSource",  # a .zip file: a Slack export
    "finetune_kit.sources.files:LocalPathSource",  # anything else: a folder or a file (last: it claims every spec)
)
LAST = "local"  # the name of the kind that claims every spec

_kinds: list[SourceKind] = []


def kinds() -> list[SourceKind]:
    """Every kind, in order of precedence (the built-in ones load on first use)."""
    if not _kinds:
        _kinds.extend(_load(entry) for entry in BUILT_IN)
    return _kinds


def _load(entry: str) -> SourceKind:
    module, name = entry.split(":")
    kind = getattr(importlib.import_module(module), name)()
    if not isinstance(kind, SourceKind):
        raise TypeError(f"{entry} does not implement SourceKind (name, claims, identity, read)")
    return kind


def register(kind: SourceKind, before: str = LAST) -> None:
    """Add a kind, asked just before the kind named `before` (by default before the catch-all local paths)."""
    names = [known.name for known in kinds()]
    if kind.name in names:
        raise ValueError(f"a source kind named {kind.name!r} is already registered")
    kinds().insert(names.index(before), kind)


def kind_for(spec: str) -> SourceKind:
    """The first kind, in order of precedence, that claims `spec`."""
    for kind in kinds():
        if kind.claims(spec):
            return kind
    raise SourceError(
        f"{spec}: no source kind reads this — pass a folder, a file, a git repository, a website URL,"
        " a Slack export .zip or airtable:BASE_ID/TABLE"
    )
