"""Near-duplicate questions across chunks: MinHash over content-word shingles, keeping the best-answered one.

Within one chunk, generate-questions already drops near duplicates by edit similarity (near_duplicate_threshold).
Across chunks that measure fails: templated questions about different topics ("What does the documentation say
about installation?" / "...configuration?") score 0.87, above a true paraphrase ("How do I rotate an SDK key?" /
"How can I rotate my SDK key?", 0.83). Jaccard similarity of content-word shingles (stop words left out) separates
them (0.43 and 1.0); MinHash with banded LSH finds the candidate pairs without comparing every pair, and each
candidate is confirmed with its exact Jaccard before it counts.
"""

import itertools
import re
import sqlite3
import zlib
from dataclasses import dataclass

import numpy as np

from finetune_kit.config import Settings
from finetune_kit.prompts import load_prompt
from finetune_kit.stages.build_dataset import CHUNK_ANSWER_KEY, answer_keys
from finetune_kit.stages.generate_questions import generation_key
from finetune_kit.store import Store

N_PERMUTATIONS = 64
BANDS = (
    32  # 2 rows a band: a pair with Jaccard 0.5 becomes a candidate with probability 1 - (1 - 0.25)^32 > 0.99
)
_PRIME = np.uint64(4_294_967_311)  # the smallest prime above 2^32
_WORD = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_STOP_WORDS_TEXT = """
a an the and or but if of to in on at by for from with about into over as is are was were be been being do does did
done can could should would will shall may might must i me my we our you your it its this that these those there here
what which who whom whose when where why how any some all each every no not than then so such very just also only get
got use using used say says said tell explain describe documentation docs give given details detail know need
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


def shingles(text: str) -> set[str]:
    """The content words of a question and their adjacent pairs."""
    words = [w.strip(".-") for w in _WORD.findall(text.lower())]
    content = [w for w in words if w and w not in STOP_WORDS]
    return set(content) | {f"{a} {b}" for a, b in itertools.pairwise(content)}


def jaccard(a: set[str], b: set[str]) -> float:
    """Shared over all: the Jaccard similarity of two sets; two empty sets are not alike."""
    return len(a & b) / len(a | b) if a or b else 0.0


def signatures(sets: list[set[str]], seed: int = 0) -> np.ndarray:
    """One MinHash signature (N_PERMUTATIONS values) per shingle set, from seeded hash permutations."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32, N_PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, 2**32, N_PERMUTATIONS, dtype=np.uint64)
    out = np.full((len(sets), N_PERMUTATIONS), np.iinfo(np.uint64).max, dtype=np.uint64)
    for row, items in enumerate(sets):
        if items:
            hashed = np.array([zlib.crc32(item.encode()) for item in items], dtype=np.uint64)
            out[row] = ((np.outer(hashed, a) + b) % _PRIME).min(axis=0)
    return out


def candidate_pairs(sigs: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of rows whose signatures agree on every value of at least one band."""
    rows = N_PERMUTATIONS // BANDS
    pairs: set[tuple[int, int]] = set()
    for band in range(BANDS):
        buckets: dict[bytes, list[int]] = {}
        for i, sig in enumerate(sigs[:, band * rows : (band + 1) * rows]):
            buckets.setdefault(sig.tobytes(), []).append(i)
        for members in buckets.values():
            pairs.update((x, y) for n, x in enumerate(members) for y in members[n + 1 :])
    return pairs


@dataclass(frozen=True)
class Duplicate:
    """A question left out of the dataset and the one kept in its place."""

    dropped: int
    kept: int
    similarity: float


def near_duplicates(
    texts: list[str], groups: list[str], rank: list[float], threshold: float
) -> list[Duplicate]:
    """Questions of different `groups` (chunks) alike at `threshold` or more; in each cluster the best `rank` stays."""
    sets = [shingles(text) for text in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    similar: dict[tuple[int, int], float] = {}
    for x, y in sorted(candidate_pairs(signatures(sets))):
        if groups[x] != groups[y] and (score := jaccard(sets[x], sets[y])) >= threshold:
            similar[(x, y)] = score
            parent[root(x)] = root(y)
    clusters: dict[int, list[int]] = {}
    for i in {i for pair in similar for i in pair}:
        clusters.setdefault(root(i), []).append(i)
    found = []
    for members in clusters.values():
        keeper = max(members, key=lambda i: (rank[i], -i))
        for i in sorted(members):
            if i != keeper:
                score = similar.get((min(i, keeper), max(i, keeper)), jaccard(sets[i], sets[keeper]))
                found.append(Duplicate(i, keeper, round(score, 3)))
    return found


DUPLICATE = "near duplicate of a question on another chunk"
_BEFORE = "; before: "  # what the answer's reason was before it was marked, restored when the mark is lifted


def drop_corpus_duplicates(store: Store, settings: Settings, identity: str, model: str) -> int:
    """Mark accepted answers whose question another chunk's question duplicates; returns how many were marked.

    Marks are lifted and made again on every build, so a duplicate returns when the question it lost to leaves.
    """
    params = {"q_key": _question_key(settings, identity, model), **answer_keys(settings, identity, model)}
    with store.transaction() as db:
        _lift_marks(db, params)
        if not settings.dedupe_across_chunks:
            return 0
        rows = db.execute(_ACCEPTED, params).fetchall()
        found = near_duplicates(
            [row["question"] for row in rows],
            [row["chunk_id"] for row in rows],
            [_answers_best(row) for row in rows],
            settings.corpus_duplicate_threshold,
        )
        for dup in found:
            row, kept = rows[dup.dropped], rows[dup.kept]
            reason = f"{DUPLICATE} — {dup.similarity:.2f} like: {kept['question']}"
            reason += f"{_BEFORE}{row['reason']}" if row["reason"] else ""
            db.execute(
                "UPDATE answers SET status = 'rejected', reason = ? WHERE question_id = ? AND answer_key = ?",
                (reason, row["question_id"], row["answer_key"]),
            )
    return len(found)


def _answers_best(row: sqlite3.Row) -> float:
    """Checked answers first, then the share of the question's content words that its chunk holds."""
    asked = shingles(row["question"])
    words = {w for w in asked if " " not in w}
    held = len(words & shingles(row["chunk"])) / len(words) if words else 0.0
    return (row["reason"] is None) * 2 + held


def _lift_marks(db: sqlite3.Connection, params: dict[str, str]) -> None:
    marked = db.execute(
        "SELECT a.question_id, a.answer_key, a.reason FROM answers a JOIN questions q ON q.id = a.question_id"
        " JOIN chunks c ON c.id = q.chunk_id JOIN documents d ON d.id = c.document_id"
        f" WHERE a.reason LIKE :prefix AND a.answer_key = {CHUNK_ANSWER_KEY}",
        {**params, "prefix": DUPLICATE + "%"},
    ).fetchall()
    for row in marked:
        before = row["reason"].split(_BEFORE, 1)[1] if _BEFORE in row["reason"] else None
        db.execute(
            "UPDATE answers SET status = 'accepted', reason = ? WHERE question_id = ? AND answer_key = ?",
            (before, row["question_id"], row["answer_key"]),
        )


def _question_key(settings: Settings, identity: str, model: str) -> str:
    return generation_key(settings, load_prompt("questions", settings.prompts_dir), identity, model)


_ACCEPTED = (
    "SELECT q.id AS question_id, q.text AS question, q.chunk_id, c.text AS chunk, a.answer_key, a.reason"
    " FROM answers a JOIN questions q ON q.id = a.question_id JOIN chunks c ON c.id = q.chunk_id"
    " JOIN documents d ON d.id = c.document_id"
    f" WHERE c.status = 'active' AND q.generation_key = :q_key AND a.answer_key = {CHUNK_ANSWER_KEY}"
    " AND a.status = 'accepted' ORDER BY c.document_id, c.seq, q.seq"
)
