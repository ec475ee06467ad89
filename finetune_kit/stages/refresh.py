"""Refresh: read every source the workspace knows again, re-index what changed, and say what changed per source."""

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from finetune_kit.config import Settings
from finetune_kit.errors import DiskFullError, FtkitError, SourceError, StoreError
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.retrieval.index import EmbedderFactory, IndexReport, update_index
from finetune_kit.sources.registry import kind_for
from finetune_kit.stages.ingest import ingest
from finetune_kit.store import Store

log = logging.getLogger(__name__)


@dataclass
class SourceChange:
    """What one refresh changed in one source; `error` says why a source could not be read (nothing changed)."""

    kind: str
    spec: str
    documents_added: int = 0
    documents_changed: int = 0
    documents_retired: int = 0
    documents_unchanged: int = 0
    chunks_added: int = 0
    chunks_retired: int = 0
    windows_embedded: int | None = (
        None  # None: ingest left the index alone (index_on_ingest off, or it said why)
    )
    skipped: int = 0
    error: str | None = None

    def line(self) -> str:
        """One plain line for the terminal."""
        if self.error is not None:
            return f"{self.spec} ({self.kind}): not refreshed — {self.error}"
        windows = "" if self.windows_embedded is None else f"; {self.windows_embedded} windows embedded"
        return (
            f"{self.spec} ({self.kind}): {self.documents_added} documents added, {self.documents_changed} changed,"
            f" {self.documents_retired} retired, {self.documents_unchanged} unchanged;"
            f" {self.chunks_added} chunks added, {self.chunks_retired} retired{windows}"
        )


@dataclass
class RefreshReport:
    """Every source's change, and the index as refresh left it (None: it could not follow; ingest said why)."""

    sources: list[SourceChange] = field(default_factory=list)
    index: IndexReport | None = None


@dataclass(frozen=True)
class _Snapshot:
    documents: dict[str, str]  # path -> active document id
    chunks: set[str]  # active chunk ids


def refresh_sources(
    store: Store,
    settings: Settings,
    progress: Progress | None = None,
    open_embedder: EmbedderFactory | None = None,
) -> RefreshReport:
    """Re-ingest every source in the sources table (a failing one is reported, the others go on); the index follows."""
    progress = progress or NoProgress()
    report = RefreshReport()
    rows = store.db.execute("SELECT id, spec, kind FROM sources ORDER BY kind, spec").fetchall()
    if not rows:
        raise SourceError("this workspace has no sources yet — run `ftkit ingest DOCS` first")
    for row in rows:
        change, index = _refresh_source(store, settings, row, progress, open_embedder)
        report.sources.append(change)
        report.index = index or report.index
    if all(change.error is not None for change in report.sources):
        raise SourceError("; ".join(str(change.error) for change in report.sources))
    if not settings.retrieval.index_on_ingest:  # ingest left the index alone: refresh still lets it follow
        report.index = update_index(store, settings, progress, open_embedder=open_embedder)
    return report


def _refresh_source(
    store: Store,
    settings: Settings,
    source: sqlite3.Row,
    progress: Progress,
    open_embedder: EmbedderFactory | None,
) -> tuple[SourceChange, IndexReport | None]:
    """Ingest one source again (the index follows) and compare its documents and chunks before and after."""
    source_id, change = source["id"], SourceChange(source["kind"], source["spec"])
    before = _snapshot(store, source_id)
    try:
        spec = readable_spec(store, source_id, source["spec"])
        ingested = ingest(store, settings, [spec], progress, open_embedder)
    except (DiskFullError, StoreError):
        raise  # the workspace itself is in trouble: no other source would fare better
    except FtkitError as exc:
        log.warning("refresh: %s", exc)
        change.error = str(exc)
        return change, None
    _compare(before, _snapshot(store, source_id), change)
    change.skipped = int(store.scalar("SELECT count(*) FROM skipped_files WHERE source_id = ?", (source_id,)))
    change.windows_embedded = ingested.index.windows_embedded if ingested.index else None
    return change, ingested.index


def _snapshot(store: Store, source_id: str) -> _Snapshot:
    documents = dict(
        store.db.execute(
            "SELECT path, id FROM documents WHERE source_id = ? AND status = 'active'", (source_id,)
        ).fetchall()
    )
    chunks = {
        row[0]
        for row in store.db.execute(
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE d.source_id = ? AND c.status = 'active'",
            (source_id,),
        )
    }
    return _Snapshot(documents, chunks)


def _compare(before: _Snapshot, after: _Snapshot, change: SourceChange) -> None:
    """Count documents added, changed (same path, new content), retired and unchanged, and chunks in and out."""
    old, new = before.documents, after.documents
    change.documents_added = len(new.keys() - old.keys())
    change.documents_retired = len(old.keys() - new.keys())
    change.documents_changed = sum(old[path] != new[path] for path in old.keys() & new.keys())
    change.documents_unchanged = sum(old[path] == new[path] for path in old.keys() & new.keys())
    change.chunks_added = len(after.chunks - before.chunks)
    change.chunks_retired = len(before.chunks - after.chunks)


def readable_spec(store: Store, source_id: str, spec: str) -> str:
    """The spec that names this source from here: as stored, or a relative folder found again from its documents."""
    if _source_id(spec) == source_id:
        return spec
    root = _root_from_documents(store, source_id)
    if root is not None and _source_id(root) == source_id:
        return root
    if _is_local(spec) and not any(Path(p).expanduser().exists() for p in (spec, root) if p):
        raise SourceError(
            f"{spec}: this source's root is gone — restore it, or ignore this line if it was removed"
        )
    raise SourceError(
        f"{spec}: names another source from here — run ftkit refresh from where it was ingested"
    )


def _is_local(spec: str) -> bool:
    return "://" not in spec and not spec.startswith("airtable:")


def _source_id(spec: str) -> str | None:
    try:
        return kind_for(spec).identity(spec).id
    except SourceError:
        return None


def _root_from_documents(store: Store, source_id: str) -> str | None:
    """A local source's absolute root, from one document's file:// URL minus its relative path."""
    row = store.db.execute(
        "SELECT path, source_url FROM documents WHERE source_id = ? AND source_url LIKE 'file:%' LIMIT 1",
        (source_id,),
    ).fetchone()
    if row is None:
        return None
    file_path = unquote(urlparse(row["source_url"]).path)
    suffix = "/" + row["path"]
    return file_path[: -len(suffix)] if file_path.endswith(suffix) else None
