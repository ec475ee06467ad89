"""The small types every retrieval module shares: the embedder protocol and a search hit."""

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors; `key` names the model and window (stored with the index)."""

    key: str  # e.g. "all-MiniLM-L6-v2@256"; an index built with another key is refused until rebuilt
    dim: int
    window_tokens: int  # the most tokens one text may have; longer ones are split into windows first

    def count_tokens(self, text: str) -> int:
        """How many of the embedder's tokens `text` has (special tokens excluded)."""
        ...

    def windows(self, text: str, size: int, overlap: int) -> list[str]:
        """`text` cut into pieces of at most `size` tokens, `overlap` tokens shared by neighbours."""
        ...

    def embed(self, texts: list[str]) -> Vectors:
        """One L2-normalised float32 row per text, shape (len(texts), dim)."""
        ...


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk, ranked; `score` is the fused score, the others say why it ranked."""

    rank: int  # 1-based
    score: float  # reciprocal-rank fusion score (or MMR's order when --mmr)
    chunk_id: str
    path: str  # the document's path as stored, relative to its source
    heading: str  # the chunk's heading path, "Guide > Keys > Rotating"
    url: str  # the chunk's source URL (file:, https:, airtable, slack permalink)
    title: str  # the document's title (its first heading, else its path)
    text: str  # the whole chunk, what an answer sees
    snippet: str  # a short excerpt around the best-matching window
    dense_score: float | None  # cosine of the query and the chunk's best window; None without embeddings
    lexical_score: float | None  # BM25 (higher is better); None when the chunk matched no query term
    dense_rank: int | None
    lexical_rank: int | None
