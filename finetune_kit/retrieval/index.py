"""The index that follows the chunks: FTS5 rows, and embedder-sized windows whose vectors are stored by text hash.

Every active chunk is indexed once per version (its id and its document's id): lexically with its document's
title and heading path, and densely as windows that fit the embedder, so no tail of a long chunk is invisible to
dense search. Vectors are looked up by the window's text hash and the embedder's key, so re-indexing an unchanged
corpus embeds nothing and an edited file only its changed chunks. Embeddings are computed outside the write
transaction; each batch's FTS rows, windows and vectors are written in one, with the generation bumped, so a
`kill -9` leaves an index that agrees with the chunks it holds and a re-run completes it. The caller holds the
workspace's writer lock (`pipeline.recorded_run`).
"""

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune_kit.config import Settings
from finetune_kit.errors import ExtraMissingError, RetrievalIndexError
from finetune_kit.progress import NoProgress, Progress
from finetune_kit.retrieval.types import Embedder
from finetune_kit.store import Store

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[Settings], Embedder]
LEXICAL_ONLY = "lexical-only"  # the embedder key of an index built without an embedder
LAYOUT_VERSION = (
    "w1"  # how windows are cut and prefixed; a change re-windows (vectors are reused by text hash)
)
BATCH_CHUNKS = 16  # chunks written per transaction
EMBED_BATCH = 32  # texts per embed() call
PREFIX_SHARE = 4  # the title and heading path take at most a quarter of a window


@dataclass
class IndexReport:
    """What one update of the index changed, and what it holds now."""

    chunks_added: int = 0
    chunks_removed: int = 0
    windows_embedded: int = 0
    windows_reused: int = 0
    seconds: float = 0.0
    embedder_key: str = LEXICAL_ONLY
    n_chunks: int = 0
    n_windows: int = 0
    generation: int = 0
    rebuilt: str | None = None  # why every chunk was indexed again
    warning: str | None = None  # the one line to show (an index without vectors, and the extra to install)

    def line(self) -> str:
        """`Index: 3 chunks added, 1 removed; 7 windows embedded, 40 reused (all-MiniLM-L6-v2@256), 0.4 s.`"""
        return (
            f"Index: {self.chunks_added} chunks added, {self.chunks_removed} removed; {self.windows_embedded}"
            f" windows embedded, {self.windows_reused} reused ({self.embedder_key}); {self.n_chunks} chunks,"
            f" {self.n_windows} windows in all, {self.seconds:.1f} s."
        )


@dataclass(frozen=True)
class IndexState:
    """What the index holds: its embedder, size, generation and the "I don't know" threshold stored with it."""

    embedder_key: str
    layout: str
    n_chunks: int
    n_windows: int
    generation: int
    threshold: float | None
    calibration: dict[str, Any] | None

    @property
    def lexical_only(self) -> bool:
        """True when the index was built without an embedder (BM25 only)."""
        return self.embedder_key == LEXICAL_ONLY

    def line(self, threshold_setting: float | None = None) -> str:
        """`120 chunks, 310 windows, all-MiniLM-L6-v2@256, threshold 0.41 (calibrated), generation 7`."""
        if threshold_setting is not None:
            threshold = f"{threshold_setting:.3g} (setting)"
        elif self.threshold is not None:
            threshold = f"{self.threshold:.3g} (calibrated)"
        else:
            threshold = "not calibrated"
        return (
            f"{self.n_chunks} chunks, {self.n_windows} windows, {self.embedder_key}, threshold {threshold},"
            f" generation {self.generation}"
        )


@dataclass(frozen=True)
class _Window:
    seq: int
    text: str  # what is embedded: the title and heading path, then the window of chunk text
    text_hash: str
    char_start: int
    char_end: int


def default_embedder(settings: Settings) -> Embedder:
    """The embedder the settings name (the bundled MiniLM, or an OpenAI-compatible /v1/embeddings model)."""
    from finetune_kit.retrieval.embedder import open_embedder

    return open_embedder(settings)


def update_index(
    store: Store,
    settings: Settings,
    on_progress: Progress | None = None,
    *,
    rebuild: bool = False,
    open_embedder: EmbedderFactory | None = None,
) -> IndexReport:
    """Bring the index in line with the active chunks (rebuild: drop it and its vectors first)."""
    started, progress = time.monotonic(), on_progress or NoProgress()
    report = IndexReport()
    embedder, report.warning = _embedder(store, settings, open_embedder or default_embedder)
    report.embedder_key = embedder.key if embedder else LEXICAL_ONLY
    layout = _layout(settings, embedder)
    report.rebuilt = _prepare(store, report.embedder_key, layout, rebuild)
    report.chunks_removed = _remove_stale(store)
    todo = _chunks_to_add(store)
    if todo:
        progress.start("index", len(todo))
        size, overlap = _window_size(settings, embedder)
        titles: dict[str, str] = {}
        for batch in _batched(todo, BATCH_CHUNKS):
            _add_batch(store, embedder, batch, titles, size, overlap, report)
            progress.advance(len(batch))
        progress.finish()
    if report.chunks_removed or report.rebuilt:
        _prune_embeddings(store, report.embedder_key)
    state = index_state(store)
    if state is not None:
        report.n_chunks, report.n_windows, report.generation = (
            state.n_chunks,
            state.n_windows,
            state.generation,
        )
    report.seconds = time.monotonic() - started
    return report


def _embedder(
    store: Store, settings: Settings, open_embedder: EmbedderFactory
) -> tuple[Embedder | None, str | None]:
    """The embedder, or None and a warning when none is installed and the index has no vectors yet."""
    try:
        return open_embedder(settings), None
    except ExtraMissingError as exc:
        built_with = _meta(store).get("embedder_key")
        if built_with not in (None, LEXICAL_ONLY):
            raise  # an index with vectors is not quietly degraded: say what to install
        warning = f"the search index is lexical only (BM25, no dense search): {exc}"
        log.warning("%s", warning)
        return None, warning


def _layout(settings: Settings, embedder: Embedder | None) -> str:
    if embedder is None:
        return LAYOUT_VERSION
    size, overlap = _window_size(settings, embedder)
    return f"{LAYOUT_VERSION}:{size}:{overlap}"


def _window_size(settings: Settings, embedder: Embedder | None) -> tuple[int, int]:
    """Window and overlap in the embedder's tokens: the setting, never more than the embedder reads."""
    if embedder is None:
        return 0, 0
    size = min(settings.retrieval.window_tokens or embedder.window_tokens, embedder.window_tokens)
    return size, min(settings.retrieval.window_overlap_tokens, size // 2)


def _prepare(store: Store, key: str, layout: str, rebuild: bool) -> str | None:
    """Check the index was built with this embedder; clear it when it must be built again, and say why."""
    meta = _meta(store)
    built_with = meta.get("embedder_key")
    why = _rebuild_reason(built_with, meta.get("layout"), key, layout, rebuild)
    if why is None and built_with is not None:
        return None
    with store.transaction() as db:
        if why is not None:
            _clear(db, drop_vectors=rebuild or built_with != key)
        db.executemany(
            "INSERT INTO index_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [("embedder_key", key), ("layout", layout)],
        )
        _bump_generation(db)
    if why is not None:
        log.info("indexing every chunk again: %s", why)
    return why


def _rebuild_reason(
    built_with: str | None, built_layout: str | None, key: str, layout: str, rebuild: bool
) -> str | None:
    """Why every chunk must be indexed again (None: the index can be updated); refuses another embedder's index."""
    if rebuild:
        return "--rebuild"
    if built_with is None:
        return None
    if built_with == LEXICAL_ONLY and key != LEXICAL_ONLY:
        return f"adding {key} vectors to a lexical-only index"
    if built_with != key:
        raise RetrievalIndexError(
            f"the search index was built with {built_with}, the settings say {key} — run `ftkit index --rebuild`"
            " (or set [retrieval] embedding_model back)"
        )
    return f"windows changed ({built_layout} → {layout})" if built_layout != layout else None


def _clear(db: sqlite3.Connection, drop_vectors: bool) -> None:
    """Empty the index; a new embedder also drops the vectors and the threshold calibrated on them."""
    for table in ("chunks_fts", "index_chunks", "index_windows"):
        db.execute(f"DELETE FROM {table}")
    if drop_vectors:
        db.execute("DELETE FROM embeddings")
        db.execute("DELETE FROM index_meta WHERE key IN ('threshold', 'calibration')")


def _remove_stale(store: Store) -> int:
    """Take out chunks that were retired or whose document has a new version (its title may have changed)."""
    stale = store.db.execute(
        "SELECT ic.chunk_id, ic.fts_rowid FROM index_chunks ic LEFT JOIN chunks c ON c.id = ic.chunk_id"
        " WHERE c.status IS NOT 'active' OR c.document_id != ic.document_id"
    ).fetchall()
    if not stale:
        return 0
    with store.transaction() as db:
        db.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(row["fts_rowid"],) for row in stale])
        for table in ("index_windows", "index_chunks"):
            db.executemany(f"DELETE FROM {table} WHERE chunk_id = ?", [(row["chunk_id"],) for row in stale])
        _bump_generation(db)
    return len(stale)


def _chunks_to_add(store: Store) -> list[sqlite3.Row]:
    return store.db.execute(
        "SELECT c.id, c.document_id, c.heading_path, c.text, d.path FROM chunks c"
        " JOIN documents d ON d.id = c.document_id"
        " WHERE c.status = 'active' AND c.id NOT IN (SELECT chunk_id FROM index_chunks)"
        " ORDER BY c.document_id, c.seq"
    ).fetchall()


def _add_batch(
    store: Store,
    embedder: Embedder | None,
    rows: list[sqlite3.Row],
    titles: dict[str, str],
    size: int,
    overlap: int,
    report: IndexReport,
) -> None:
    """Index a batch of chunks: embed the windows not yet embedded, then write everything in one transaction."""
    planned = []
    for row in rows:
        title = titles.get(row["document_id"]) or titles.setdefault(
            row["document_id"], document_title(store, row)
        )
        heading = heading_text(row["heading_path"])
        windows = _windows(embedder, row["text"], title, heading, size, overlap) if embedder else []
        planned.append((row, title, heading, windows))
    vectors = _new_vectors(store, embedder, [w for *_, windows in planned for w in windows], report)
    key = report.embedder_key
    with store.transaction() as db:
        db.executemany(
            "INSERT OR IGNORE INTO embeddings(text_hash, embedder_key, vector) VALUES (?, ?, ?)",
            [(text_hash, key, vector) for text_hash, vector in vectors.items()],
        )
        for row, title, heading, windows in planned:
            _write_chunk(db, row, title, heading, windows)
        _bump_generation(db)
    report.chunks_added += len(rows)


def _write_chunk(
    db: sqlite3.Connection, row: sqlite3.Row, title: str, heading: str, windows: list[_Window]
) -> None:
    cur = db.execute(
        "INSERT INTO chunks_fts(chunk_id, title, heading, text) VALUES (?, ?, ?, ?)",
        (row["id"], title, heading, row["text"]),
    )
    db.execute(
        "INSERT INTO index_chunks(chunk_id, document_id, fts_rowid, title, n_windows) VALUES (?, ?, ?, ?, ?)",
        (row["id"], row["document_id"], cur.lastrowid, title, len(windows)),
    )
    db.executemany(
        "INSERT INTO index_windows(chunk_id, seq, text_hash, char_start, char_end) VALUES (?, ?, ?, ?, ?)",
        [(row["id"], w.seq, w.text_hash, w.char_start, w.char_end) for w in windows],
    )


def _new_vectors(
    store: Store, embedder: Embedder | None, windows: list[_Window], report: IndexReport
) -> dict[str, bytes]:
    """Vectors for the windows whose text hash has none yet under this embedder (outside any transaction)."""
    if embedder is None or not windows:
        return {}
    wanted = {w.text_hash: w.text for w in windows}
    known = _known_hashes(store, list(wanted), embedder.key)
    missing = [(text_hash, text) for text_hash, text in wanted.items() if text_hash not in known]
    vectors: dict[str, bytes] = {}
    for start in range(0, len(missing), EMBED_BATCH):
        part = missing[start : start + EMBED_BATCH]
        rows = np.asarray(embedder.embed([text for _, text in part]), dtype=np.float32)
        vectors |= {text_hash: row.tobytes() for (text_hash, _), row in zip(part, rows, strict=True)}
    report.windows_embedded += len(missing)
    report.windows_reused += len(windows) - len(missing)
    return vectors


def _known_hashes(store: Store, hashes: list[str], key: str) -> set[str]:
    known: set[str] = set()
    for start in range(0, len(hashes), 500):  # SQLite bounds the number of parameters
        part = hashes[start : start + 500]
        marks = ",".join("?" * len(part))
        known |= {
            row[0]
            for row in store.db.execute(
                f"SELECT text_hash FROM embeddings WHERE embedder_key = ? AND text_hash IN ({marks})",
                (key, *part),
            )
        }
    return known


def document_title(store: Store, row: sqlite3.Row) -> str:
    """A document's title: its first heading (as the chunker read it), else its path."""
    first = store.scalar(
        "SELECT heading_path FROM chunks WHERE document_id = ? AND status = 'active' AND heading_path != '[]'"
        " ORDER BY seq LIMIT 1",
        (row["document_id"],),
    )
    headings = json.loads(first) if first else []
    return str(headings[0]) if headings else str(row["path"])


def heading_text(heading_path_json: str) -> str:
    """A stored heading path as the user reads it: `Guide > Keys > Rotating`."""
    return " > ".join(str(part) for part in json.loads(heading_path_json))


def _windows(
    embedder: Embedder, text: str, title: str, heading: str, size: int, overlap: int
) -> list[_Window]:
    """The chunk cut into embedder-sized windows, each led by the title and heading path (kept short)."""
    prefix = _prefix(embedder, title, heading, size)
    body = max(size - (embedder.count_tokens(prefix) + 2 if prefix else 0), size // 2)
    pieces = [piece for piece in embedder.windows(text, body, min(overlap, body // 2)) if piece.strip()]
    windows = []
    for seq, (piece, (start, end)) in enumerate(zip(pieces, _spans(text, pieces), strict=True)):
        embedded = f"{prefix}\n{piece}" if prefix else piece
        windows.append(_Window(seq, embedded, hashlib.sha256(embedded.encode()).hexdigest(), start, end))
    return windows


def _prefix(embedder: Embedder, title: str, heading: str, size: int) -> str:
    prefix = heading if heading.split(" > ")[0] == title else " > ".join(p for p in (title, heading) if p)
    limit = size // PREFIX_SHARE
    if prefix and embedder.count_tokens(prefix) > limit:
        prefix = embedder.windows(prefix, limit, 0)[0]
    return prefix


def _spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each window lies in the chunk's text; a window the tokenizer normalised is placed by its length."""
    spans, cursor, total = [], 0, sum(len(piece) for piece in pieces) or 1
    done = 0
    for piece in pieces:
        start = text.find(piece, cursor) if piece else -1
        if start < 0:
            start = min(round(done / total * len(text)), len(text))
            end = min(start + len(piece), len(text))
        else:
            end = start + len(piece)
            cursor = start + 1
        spans.append((start, end))
        done += len(piece)
    return spans


def _prune_embeddings(store: Store, key: str) -> None:
    """Drop vectors no window uses any more (retired chunks, another embedder's), so the database stays bounded."""
    with store.transaction() as db:
        db.execute(
            "DELETE FROM embeddings WHERE embedder_key != ? OR text_hash NOT IN (SELECT text_hash FROM index_windows)",
            (key,),
        )


def _bump_generation(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT INTO index_meta(key, value) VALUES ('generation', '1')"
        " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )


def _meta(store: Store) -> dict[str, str]:
    return {row[0]: row[1] for row in store.db.execute("SELECT key, value FROM index_meta")}


def generation(store: Store) -> int:
    """The index's generation: bumped by every change, so a running retriever knows to reload."""
    return int(store.scalar("SELECT value FROM index_meta WHERE key = 'generation'") or 0)


def index_state(store: Store) -> IndexState | None:
    """What the index holds (None: never built); counts only chunks that are active in this version."""
    meta = _meta(store)
    if "embedder_key" not in meta:
        return None
    current = (
        "FROM index_chunks ic JOIN chunks c ON c.id = ic.chunk_id"
        " WHERE c.status = 'active' AND c.document_id = ic.document_id"
    )
    return IndexState(
        embedder_key=meta["embedder_key"],
        layout=meta.get("layout", ""),
        n_chunks=int(store.scalar(f"SELECT count(*) {current}") or 0),
        n_windows=int(store.scalar(f"SELECT coalesce(sum(ic.n_windows), 0) {current}") or 0),
        generation=int(meta.get("generation", 0)),
        threshold=float(meta["threshold"]) if "threshold" in meta else None,
        calibration=json.loads(meta["calibration"]) if "calibration" in meta else None,
    )


def set_threshold(store: Store, value: float, stats: dict[str, Any]) -> None:
    """Store the calibrated "I don't know" threshold and how it was found, with the index."""
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO index_meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [("threshold", repr(float(value))), ("calibration", json.dumps(stats, sort_keys=True))],
        )


def _batched(rows: list[sqlite3.Row], n: int) -> Iterator[list[sqlite3.Row]]:
    for start in range(0, len(rows), n):
        yield rows[start : start + n]
