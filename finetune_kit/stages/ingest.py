"""Ingest: read sources into content-hashed documents and chunk them; unchanged files cost nothing."""

import hashlib
import json
import logging
import sqlite3
from collections import Counter
from dataclasses import dataclass, field

from finetune_kit.chunking.code import CODE_CHUNKER_VERSION, chunk_code_document, line_permalink
from finetune_kit.chunking.markdown import Chunk, ChunkSettings, chunk_markdown
from finetune_kit.config import Settings
from finetune_kit.errors import ExtraMissingError, RetrievalIndexError, SourceError
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.retrieval.index import EmbedderFactory, IndexReport, update_index
from finetune_kit.sources import ReadContext, SkippedFile, SourceDocument, SourceIdentity, SourceItem
from finetune_kit.sources.registry import kind_for
from finetune_kit.store import Store, utc_now

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What one ingest changed."""

    sources: int = 0
    documents_new: int = 0
    documents_unchanged: int = 0
    documents_rechunked: int = 0
    documents_retired: int = 0
    chunks_new: int = 0
    chunks_retired: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    failed_sources: list[tuple[str, str]] = field(
        default_factory=list
    )  # (spec, why it gave nothing), when others did
    index: IndexReport | None = None  # the search index brought up to date (None: it could not be, said why)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def chunk_settings(settings: Settings) -> ChunkSettings:
    """The chunker's settings from ftkit's."""
    return ChunkSettings(
        target_tokens=settings.chunk_target_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
        min_tokens=settings.chunk_min_tokens,
    )


def chunker_key(settings: ChunkSettings, fmt: str = "markdown") -> str:
    """Identifies how chunks were cut, so a change of chunk settings (or of the code chunker) re-chunks."""
    key = f"k1:{settings.target_tokens}:{settings.overlap_tokens}:{settings.min_tokens}"
    return f"{key}:code{CODE_CHUNKER_VERSION}" if fmt == "code" else key


def ingest(
    store: Store,
    settings: Settings,
    specs: list[str],
    progress: Progress | None = None,
    open_embedder: EmbedderFactory | None = None,
) -> IngestReport:
    """Read every source in `specs` (folders, files, git repositories, Slack exports, websites) into the DB.

    Then the search index follows the chunks (`retrieval.index.update_index`, with `open_embedder` if given)
    unless [retrieval] index_on_ingest is off.
    """
    progress = progress or NoProgress()
    report = IngestReport()
    for spec in specs:
        try:
            _ingest_source(store, settings, spec, progress, report)
        except SourceError as exc:
            if len(specs) == 1:
                raise
            log.warning("%s", exc)
            report.failed_sources.append((spec, str(exc)))
    if report.sources == 0 and report.failed_sources:
        raise SourceError("; ".join(message for _, message in report.failed_sources))
    if settings.retrieval.index_on_ingest:
        report.index = _keep_index_current(store, settings, progress, open_embedder)
    return report


def _keep_index_current(
    store: Store, settings: Settings, progress: Progress, open_embedder: EmbedderFactory | None
) -> IndexReport | None:
    """Bring the search index up to date; an index that needs a rebuild is said, not fatal: the chunks are saved."""
    try:
        return update_index(store, settings, progress, open_embedder=open_embedder)
    except (RetrievalIndexError, ExtraMissingError) as exc:
        log.warning("search index not updated: %s", exc)
        progress.note(f"Warning: search index not updated: {exc}")
        return None


def _ingest_source(
    store: Store, settings: Settings, spec: str, progress: Progress, report: IngestReport
) -> None:
    """Read one source into the DB; SourceError (and nothing written) when it yields no usable document."""
    identity, items = _open_source(spec, settings, store)
    documents = [item for item in items if isinstance(item, SourceDocument)]
    skipped = [item for item in items if isinstance(item, SkippedFile)]
    if not documents:
        raise SourceError(_empty_source_message(spec, items))
    source_id = _upsert_source(store, spec, identity)
    progress.start(f"ingest {spec}", len(documents))
    kept: set[str] = set()
    for document in documents:
        try:
            _ingest_document(store, source_id, document, chunk_settings(settings), report)
            kept.add(document.path)
        except RecursionError:  # the chunkers bound their depth; this is the last line of defence
            skipped.append(
                SkippedFile(document.path, "nested too deeply to chunk — flatten it, or --exclude it")
            )
        progress.advance()
    progress.finish()
    report.skipped += [(item.path, item.reason) for item in skipped]
    _record_skips(store, source_id, skipped)
    _retire_missing(store, source_id, kept, report)
    store.db.execute("UPDATE sources SET last_sync = ? WHERE id = ?", (utc_now(), source_id))
    report.sources += 1


def _open_source(spec: str, settings: Settings, store: Store) -> tuple[SourceIdentity, list[SourceItem]]:
    """The source's identity and items, read by the kind the registry finds for the spec."""
    kind = kind_for(spec)
    identity = kind.identity(spec)
    return identity, kind.read(spec, ReadContext(settings, store, identity.id))


def _empty_source_message(spec: str, items: list[SourceItem]) -> str:
    if not items:
        return f"{spec}: no documents found — point ftkit at a folder of .md/.mdx/.rst/.html/.txt files or widen --include"
    reasons = Counter(item.reason for item in items if isinstance(item, SkippedFile))
    top = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    return f"{spec}: no usable documents ({len(items)} files skipped: {top}) — check --include/--exclude"


def _upsert_source(store: Store, spec: str, identity: SourceIdentity) -> str:
    store.db.execute(
        "INSERT INTO sources(id, spec, kind) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET spec = excluded.spec",
        (identity.id, spec, identity.kind),
    )
    return identity.id


def _ingest_document(
    store: Store, source_id: str, doc: SourceDocument, chunking: ChunkSettings, report: IngestReport
) -> None:
    content_hash = _sha(doc.text)
    doc_id = "d1:" + _sha(source_id, doc.path, content_hash)[:24]
    key = chunker_key(chunking, doc.format)
    row = store.db.execute(
        "SELECT chunker_key, source_url FROM documents WHERE id = ? AND status = 'active'", (doc_id,)
    ).fetchone()
    if row is not None and row["chunker_key"] == key and row["source_url"] == doc.source_url:
        report.documents_unchanged += 1
        return
    chunks = _chunks_with_urls(
        doc, chunking
    )  # before any write: a document that cannot be chunked changes nothing
    with store.transaction() as db:
        if row is None:
            report.documents_retired += _retire_documents(
                db, "source_id = ? AND path = ? AND status = 'active'", (source_id, doc.path), report
            )
            db.execute(
                "INSERT INTO documents(id, source_id, path, source_url, format, content_hash, chunker_key, text,"
                " ingested_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET status = 'active',"
                " retired_at = NULL, chunker_key = excluded.chunker_key",
                (
                    doc_id,
                    source_id,
                    doc.path,
                    doc.source_url,
                    doc.format,
                    content_hash,
                    key,
                    doc.text,
                    utc_now(),
                ),
            )
            report.documents_new += 1
        else:  # new chunk settings, or a new link (a workspace URL set, a URL field edited): chunks keep their ids
            report.chunks_retired += _retire_chunks(db, doc_id)
            db.execute(
                "UPDATE documents SET chunker_key = ?, source_url = ? WHERE id = ?",
                (key, doc.source_url, doc_id),
            )
            report.documents_rechunked += 1
        report.chunks_new += _insert_chunks(db, source_id, doc_id, doc, chunks)


def _insert_chunks(
    db: sqlite3.Connection, source_id: str, doc_id: str, doc: SourceDocument, chunks: list[tuple[Chunk, str]]
) -> int:
    """Insert a document's chunks; a chunk whose text is unchanged keeps its id (and its questions)."""
    new = 0
    for chunk, source_url in chunks:
        heading_path = json.dumps(list(chunk.heading_path))
        chunk_id = "c1:" + _sha(source_id, doc.path, heading_path, chunk.text)[:24]
        cur = db.execute(
            "INSERT INTO chunks(id, document_id, seq, heading_path, text, n_tokens, source_url)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET status = 'active',"
            " document_id = excluded.document_id, seq = excluded.seq, source_url = excluded.source_url"
            " WHERE chunks.status = 'retired' OR chunks.document_id != excluded.document_id"
            " OR chunks.source_url != excluded.source_url",
            (chunk_id, doc_id, chunk.seq, heading_path, chunk.text, chunk.n_tokens, source_url),
        )
        new += cur.rowcount
    return new


def _chunks_with_urls(doc: SourceDocument, chunking: ChunkSettings) -> list[tuple[Chunk, str]]:
    """A document's chunks and each one's URL: code is cut at definitions and linked to its lines."""
    if doc.format == "code":
        chunks = chunk_code_document(doc.text, doc.path, chunking)
        return [(c, line_permalink(doc.source_url, c.start_line, c.end_line)) for c in chunks]
    return [(chunk, doc.source_url) for chunk in chunk_markdown(doc.text, chunking)]


def _retire_chunks(db: sqlite3.Connection, doc_id: str) -> int:
    cur = db.execute(
        "UPDATE chunks SET status = 'retired' WHERE document_id = ? AND status = 'active'", (doc_id,)
    )
    return int(cur.rowcount)


def _retire_documents(
    db: sqlite3.Connection, where: str, params: tuple[str, ...], report: IngestReport
) -> int:
    ids = [row[0] for row in db.execute(f"SELECT id FROM documents WHERE {where}", params)]
    for doc_id in ids:
        report.chunks_retired += _retire_chunks(db, doc_id)
        db.execute(
            "UPDATE documents SET status = 'retired', retired_at = ? WHERE id = ?", (utc_now(), doc_id)
        )
    return len(ids)


def _retire_missing(store: Store, source_id: str, seen_paths: set[str], report: IngestReport) -> None:
    """Documents that vanished from a source (deleted, or now skipped) are retired with their chunks."""
    active = [
        row[0]
        for row in store.db.execute(
            "SELECT path FROM documents WHERE source_id = ? AND status = 'active'", (source_id,)
        )
    ]
    gone = [path for path in active if path not in seen_paths]
    with store.transaction() as db:
        for path in gone:
            report.documents_retired += _retire_documents(
                db, "source_id = ? AND path = ? AND status = 'active'", (source_id, path), report
            )


def _record_skips(store: Store, source_id: str, skipped: list[SkippedFile]) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM skipped_files WHERE source_id = ?", (source_id,))
        db.executemany(
            "INSERT INTO skipped_files(source_id, path, reason, seen_at) VALUES (?, ?, ?, ?)",
            [(source_id, item.path, item.reason, utc_now()) for item in skipped],
        )
