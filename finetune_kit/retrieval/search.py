"""Hybrid search: BM25 over FTS5 and dense windows, fused by reciprocal rank, with optional MMR.

The user's text never reaches FTS5 as syntax: it is cut into words, stop words dropped, and each word quoted. The
dense side keeps the index's vectors in one numpy matrix (an inner-product scan; fast to ~10^5 chunks), reloaded
when the index's generation changes, so a running bot sees new chunks without a restart. A chunk's dense score is
its best window's cosine; the snippet is cut around that window.
"""

import logging
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from finetune_kit.config import Settings
from finetune_kit.errors import RetrievalIndexError, VagueQueryError
from finetune_kit.retrieval.index import (
    EmbedderFactory,
    IndexState,
    default_embedder,
    generation,
    heading_text,
    index_state,
)
from finetune_kit.retrieval.terms import (
    STOP_WORDS,
    KnownWords,
    common_english,
    docs_vocabulary,
    docs_words,
    unknown_terms,
)
from finetune_kit.retrieval.types import Embedder, Hit, Vectors
from finetune_kit.store import Store

log = logging.getLogger(__name__)

# BM25 weights per FTS5 column: chunk_id (not indexed), title, heading path, text
BM25_WEIGHTS = (0.0, 2.0, 3.0, 1.0)
MAX_TERMS = 64  # distinct words of a query that are searched; a pasted log adds nothing past these
SNIPPET_CHARS = 240
_WORD = re.compile(r"\w+")


def query_terms(query: str) -> list[str]:
    """The distinct words of `query` worth searching for; VagueQueryError when none is left."""
    terms = list(dict.fromkeys(word for word in _WORD.findall(query.lower()) if word not in STOP_WORDS))
    if not terms:
        raise VagueQueryError(
            f"the query {query[:80]!r} is too vague: it has only common words — name what you are looking for"
        )
    return terms[:MAX_TERMS]


def fts_query(terms: list[str]) -> str:
    """An FTS5 MATCH expression that finds any of `terms`, each quoted so that none is read as syntax."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def relevance(hits: list[Hit]) -> float:
    """The score the "I don't know" gate compares to `Retriever.threshold`: the best dense cosine among the hits.

    An index without vectors (lexical only) has no cosine: the best BM25 score stands in, and a threshold
    calibrated on that index is on the same scale. No hits: 0.0.
    """
    dense = [hit.dense_score for hit in hits if hit.dense_score is not None]
    if dense:
        return max(dense)
    return max((hit.lexical_score or 0.0 for hit in hits), default=0.0)


@dataclass(frozen=True)
class _Dense:
    """The index's vectors: one row per window, windows of a chunk adjacent, and each chunk's mean direction."""

    chunk_ids: list[str]
    row_of: dict[str, int]
    starts: npt.NDArray[np.intp]  # the row at which each chunk's windows start
    windows: Vectors
    spans: list[tuple[int, int]]
    chunk_vectors: Vectors


class Retriever:
    """Searches one workspace's index; open it with `Retriever.open`."""

    def __init__(
        self, store: Store, settings: Settings, embedder: Embedder | None, state: IndexState
    ) -> None:
        self.store, self.settings, self.embedder, self.state = store, settings, embedder, state
        self._dense: _Dense | None = None
        self._generation = -1
        self._known: KnownWords | None = None
        self._docs_have = docs_vocabulary(store)

    @classmethod
    def open(
        cls, store: Store, settings: Settings, open_embedder: EmbedderFactory | None = None
    ) -> "Retriever":
        """A retriever over the store's index; RetrievalIndexError when there is none or another model built it."""
        state = index_state(store)
        if state is None or state.n_chunks == 0:
            raise RetrievalIndexError(
                f"{settings.workspace}: the search index is {'empty' if state else 'missing'} — run `ftkit index`"
            )
        embedder = None if state.lexical_only else (open_embedder or default_embedder)(settings)
        if embedder is not None and embedder.key != state.embedder_key:
            raise _built_with_another(state.embedder_key, embedder.key)
        return cls(store, settings, embedder, state)

    @property
    def threshold(self) -> float | None:
        """The "I don't know" threshold: the setting, else the one calibrated and stored with the index."""
        if self.settings.retrieval.threshold is not None:
            return self.settings.retrieval.threshold
        value = self.store.scalar("SELECT value FROM index_meta WHERE key = 'threshold'")
        return float(value) if value is not None else None

    relevance = staticmethod(relevance)

    def unknown_terms(self, query: str) -> list[str]:
        """The specific terms of `query` that the indexed docs never use (retrieval/terms.py); [] when off."""
        if not self.settings.retrieval.refuse_unknown_terms:
            return []
        self._refresh()
        if self._known is None:
            self._known = KnownWords(common_english(), lambda: docs_words(self.store))
        return unknown_terms(
            query[: self.settings.retrieval.max_query_chars],
            self.settings.product,
            self._docs_have,
            self._known,
        )

    def search(self, query: str, k: int | None = None, mmr: bool | None = None) -> list[Hit]:
        """The k best chunks for `query`, best first (VagueQueryError when it has only stop words)."""
        query = self._bounded(query)
        terms = query_terms(query)
        self._refresh()
        rs = self.settings.retrieval
        k = k or rs.k
        fetch = max(rs.fetch_k, k)
        scores = _Scores(self._lexical(terms, fetch), self._dense, self._query_vector(query), fetch)
        fused = _fuse(list(scores.lexical), scores.dense, rs.rrf_k)
        candidates = sorted(fused, key=lambda cid: -fused[cid])[:fetch]
        use_mmr = rs.mmr if mmr is None else mmr
        order = self._mmr(candidates, fused, k, rs.mmr_lambda) if use_mmr and self._dense else candidates[:k]
        return self._hits(order, fused, scores, terms)

    def chunk_hit(self, chunk_id: str) -> Hit | None:
        """An indexed chunk as a hit that no search ranked (no scores), or None when it is not in the index."""
        row = _chunk_rows(self.store, [chunk_id]).get(chunk_id)
        if row is None:
            return None
        return Hit(
            rank=0,
            score=0.0,
            chunk_id=chunk_id,
            path=row["path"],
            heading=heading_text(row["heading_path"]),
            url=row["source_url"],
            title=row["title"],
            text=row["text"],
            snippet=snippet(row["text"], []),
            dense_score=None,
            lexical_score=None,
            dense_rank=None,
            lexical_rank=None,
        )

    def _bounded(self, query: str) -> str:
        limit = self.settings.retrieval.max_query_chars
        if len(query) > limit:
            log.warning(
                "the query has %d characters: searching its first %d (max_query_chars)", len(query), limit
            )
            return query[:limit]
        return query

    def _refresh(self) -> None:
        """Reload the vectors when another process changed the index since they were loaded."""
        current = generation(self.store)
        if current == self._generation:
            return
        state = index_state(self.store)
        if state is None:
            raise RetrievalIndexError(
                f"{self.settings.workspace}: the search index is missing — run `ftkit index`"
            )
        if (
            self.embedder is not None and state.embedder_key != self.embedder.key
        ):  # rebuilt with another model
            raise _built_with_another(state.embedder_key, self.embedder.key)
        self.state, self._generation = state, current
        self._known, self._docs_have = None, docs_vocabulary(self.store)  # the docs' words may have changed
        self._dense = _load_dense(self.store, self.embedder) if self.embedder else None

    def _lexical(self, terms: list[str], limit: int) -> dict[str, float]:
        """Chunk ids and BM25 scores (higher is better) of the best lexical matches."""
        weights = ", ".join(str(w) for w in BM25_WEIGHTS)
        rows = self.store.db.execute(  # matches first, then looked up by key (CROSS JOIN keeps that order)
            f"WITH matched AS MATERIALIZED (SELECT rowid, bm25(chunks_fts, {weights}) AS score FROM chunks_fts"
            " WHERE chunks_fts MATCH ?)"
            " SELECT ic.chunk_id, matched.score FROM matched"
            " CROSS JOIN index_chunks ic ON ic.fts_rowid = matched.rowid"
            " CROSS JOIN chunks c ON c.id = ic.chunk_id AND c.status = 'active' AND c.document_id = ic.document_id"
            " ORDER BY matched.score LIMIT ?",
            (fts_query(terms), limit),
        ).fetchall()
        return {row[0]: -float(row[1]) for row in rows}  # best first

    def _query_vector(self, query: str) -> Vectors | None:
        if self.embedder is None or self._dense is None or not self._dense.chunk_ids:
            return None
        return np.asarray(self.embedder.embed([query]), dtype=np.float32)[0]

    def _mmr(self, candidates: list[str], fused: dict[str, float], k: int, lam: float) -> list[str]:
        """Maximal marginal relevance over the fused candidates, relevance being the fused score scaled to 1."""
        assert self._dense is not None
        d, top = self._dense, max(fused.values(), default=1.0) or 1.0
        vectors = np.stack([_chunk_vector(d, cid) for cid in candidates]) if candidates else np.zeros((0, 1))
        similar = vectors @ vectors.T
        chosen: list[int] = []
        left = list(range(len(candidates)))
        while left and len(chosen) < k:

            def gain(i: int) -> float:
                redundancy = max((float(similar[i, j]) for j in chosen), default=0.0)
                return lam * fused[candidates[i]] / top - (1 - lam) * redundancy

            best = max(left, key=gain)
            chosen.append(best)
            left.remove(best)
        return [candidates[i] for i in chosen]

    def _hits(
        self, order: list[str], fused: dict[str, float], scores: "_Scores", terms: list[str]
    ) -> list[Hit]:
        rows = _chunk_rows(self.store, order)
        lexical_rank = {cid: n for n, cid in enumerate(scores.lexical, 1)}
        dense_rank = {cid: n for n, cid in enumerate(scores.dense, 1)}
        hits = []
        for rank, cid in enumerate([c for c in order if c in rows], 1):
            row = rows[cid]
            cosine, span = scores.best_window(cid)
            hits.append(
                Hit(
                    rank=rank,
                    score=fused[cid],
                    chunk_id=cid,
                    path=row["path"],
                    heading=heading_text(row["heading_path"]),
                    url=row["source_url"],
                    title=row["title"],
                    text=row["text"],
                    snippet=snippet(row["text"], terms, span),
                    dense_score=cosine,
                    lexical_score=scores.lexical.get(cid),
                    dense_rank=dense_rank.get(cid),
                    lexical_rank=lexical_rank.get(cid),
                )
            )
        return hits


class _Scores:
    """One query's scores: BM25 of the chunks it matched, and the cosine of every window with the query."""

    def __init__(
        self, lexical: dict[str, float], dense: _Dense | None, query_vector: Vectors | None, fetch: int
    ) -> None:
        self.lexical, self._index = lexical, dense
        self.dense: list[str] = []  # the `fetch` chunks of best cosine, best first
        if dense is None or query_vector is None:
            self._windows = self._best = None
            return
        self._windows = dense.windows @ query_vector
        self._best = np.maximum.reduceat(self._windows, dense.starts)
        top = _top(self._best, fetch)
        self.dense = [dense.chunk_ids[i] for i in top]

    def best_window(self, chunk_id: str) -> tuple[float | None, tuple[int, int] | None]:
        """The chunk's best cosine and where that window lies in its text; (None, None) without vectors."""
        d = self._index
        i = d.row_of.get(chunk_id) if d is not None else None
        if d is None or i is None or self._windows is None or self._best is None:
            return None, None
        end = int(d.starts[i + 1]) if i + 1 < len(d.starts) else len(self._windows)
        window = int(d.starts[i]) + int(np.argmax(self._windows[int(d.starts[i]) : end]))
        return float(self._best[i]), d.spans[window]


def _top(scores: Vectors, n: int) -> npt.NDArray[np.intp]:
    """The indices of the n best scores, best first, ties in index order: a partition, then a sort of n, not of all."""
    if n < len(scores):
        part = np.argpartition(-scores, n - 1)[:n]
        cut = scores[part].min()
        part = np.flatnonzero(scores >= cut)  # every tie at the cut, so that index order decides among them
    else:
        part = np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))][:n]


def _built_with_another(built_with: str, settings_say: str) -> RetrievalIndexError:
    return RetrievalIndexError(
        f"the search index was built with {built_with}, the settings say {settings_say}"
        " — run `ftkit index --rebuild`"
    )


def _load_dense(store: Store, embedder: Embedder) -> _Dense:
    """Every current window's vector, in one snapshot of the index (a read transaction)."""
    snapshot = not store.db.in_transaction
    if snapshot:
        store.db.execute("BEGIN")
    try:
        rows = store.db.execute(
            "SELECT w.chunk_id, w.char_start, w.char_end, e.vector FROM index_windows w"
            " JOIN index_chunks ic ON ic.chunk_id = w.chunk_id"
            " JOIN chunks c ON c.id = w.chunk_id AND c.status = 'active' AND c.document_id = ic.document_id"
            " JOIN embeddings e ON e.text_hash = w.text_hash AND e.embedder_key = ?"
            " ORDER BY w.chunk_id, w.seq",
            (embedder.key,),
        ).fetchall()
    finally:
        if snapshot:
            store.db.execute("COMMIT")
    # the vector size from the stored vectors: asking an API model for its dim costs a request
    dim = len(rows[0][3]) // 4 if rows else 1
    windows = np.frombuffer(b"".join(row[3] for row in rows), dtype=np.float32).reshape(len(rows), dim)
    chunk_ids: list[str] = []
    starts: list[int] = []
    for i, row in enumerate(rows):
        if not chunk_ids or chunk_ids[-1] != row[0]:
            chunk_ids.append(row[0])
            starts.append(i)
    offsets = np.asarray(starts, dtype=np.intp)
    return _Dense(
        chunk_ids=chunk_ids,
        row_of={cid: i for i, cid in enumerate(chunk_ids)},
        starts=offsets,
        windows=windows,
        spans=[(row[1], row[2]) for row in rows],
        chunk_vectors=_mean_directions(windows, offsets),
    )


def _mean_directions(windows: Vectors, starts: npt.NDArray[np.intp]) -> Vectors:
    """Each chunk's windows summed and normalised: the direction MMR compares chunks by."""
    if not len(starts):
        return np.zeros((0, windows.shape[1]), dtype=np.float32)
    sums = np.add.reduceat(windows, starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.where(norms == 0, 1, norms)).astype(np.float32)


def _chunk_vector(d: _Dense, chunk_id: str) -> Vectors:
    i = d.row_of.get(chunk_id)
    return d.chunk_vectors[i] if i is not None else np.zeros(d.windows.shape[1], dtype=np.float32)


def _fuse(lexical: list[str], dense: list[str], rrf_k: int) -> dict[str, float]:
    """Reciprocal-rank fusion: each ranking adds 1 / (rrf_k + rank) to the chunks it holds."""
    fused: dict[str, float] = {}
    for ranking in (lexical, dense):
        for rank, cid in enumerate(ranking, 1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (rrf_k + rank)
    return fused


def _chunk_rows(store: Store, chunk_ids: list[str]) -> dict[str, dict[str, str]]:
    if not chunk_ids:
        return {}
    marks = ",".join("?" * len(chunk_ids))
    rows = store.db.execute(
        "SELECT c.id, c.text, c.heading_path, c.source_url, d.path, ic.title FROM chunks c"
        " JOIN documents d ON d.id = c.document_id JOIN index_chunks ic ON ic.chunk_id = c.id"
        f" WHERE c.id IN ({marks}) AND c.status = 'active' AND c.document_id = ic.document_id",
        chunk_ids,
    ).fetchall()
    return {row["id"]: dict(row) for row in rows}


def snippet(text: str, terms: list[str], span: tuple[int, int] | None = None) -> str:
    """About SNIPPET_CHARS of `text` around the first query word inside `span` (the best window), spaces squeezed."""
    start, end = span or (0, len(text))
    window = text[start:end] or text
    lowered = window.lower()
    hits = [pos for term in terms if (pos := _find_word(lowered, term)) >= 0]
    centre = min(hits) if hits else 0
    lo = max(0, min(centre - SNIPPET_CHARS // 3, len(window) - SNIPPET_CHARS))
    piece = " ".join(window[lo : lo + SNIPPET_CHARS].split())
    return ("…" if start + lo > 0 else "") + piece + ("…" if start + lo + SNIPPET_CHARS < len(text) else "")


def _find_word(lowered: str, term: str) -> int:
    """Where `term` (or its stem, as the index's stemmer would match it) first appears; -1 when nowhere."""
    pos = lowered.find(term)
    return pos if pos >= 0 or len(term) <= 5 else lowered.find(term[:5])


def search_workspace(settings: Settings, query: str) -> list[Hit]:
    """`ftkit search`: the workspace's best chunks for `query` (k and MMR from the settings)."""
    if not settings.db_path.is_file():
        raise RetrievalIndexError(f"{settings.workspace}: the search index is missing — run `ftkit index`")
    with Store(settings.db_path) as store:
        return Retriever.open(store, settings).search(query)


def hit_json(hit: Hit) -> dict[str, object]:
    """One hit's fields as `ftkit search --json` shows them."""
    return {
        "rank": hit.rank,
        "score": hit.score,
        "path": hit.path,
        "heading": hit.heading,
        "url": hit.url,
        "snippet": hit.snippet,
        "chunk_id": hit.chunk_id,
        "text": hit.text,
    }
