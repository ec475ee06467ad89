"""A small deterministic Embedder for the index's tests: a hashed bag of words (a real implementation, no model)."""

import hashlib
import re
import time

import numpy as np

from finetune_kit.retrieval.types import Vectors

_WORD = re.compile(r"\w+")


class HashedEmbedder:
    """Each word hashed into one of `dim` signed buckets; windows are runs of words cut from the text itself."""

    dim = 256

    def __init__(self, window_tokens: int = 32, delay_s: float = 0.0, name: str = "hashed-bow") -> None:
        self.window_tokens = window_tokens
        self.key = f"{name}@{window_tokens}"
        self.delay_s = delay_s
        self.embedded: list[str] = []  # every text embedded, in order

    def count_tokens(self, text: str) -> int:
        """Words in `text`."""
        return len(_WORD.findall(text))

    def windows(self, text: str, size: int, overlap: int) -> list[str]:
        """Runs of at most `size` words, neighbours sharing `overlap`, each an exact slice of `text`."""
        spans = [m.span() for m in _WORD.finditer(text)]
        if len(spans) <= size:
            return [text]
        step, pieces = max(size - overlap, 1), []
        for first in range(0, len(spans), step):
            last = min(first + size, len(spans)) - 1
            pieces.append(text[spans[first][0] : spans[last][1]])
            if last == len(spans) - 1:
                break
        return pieces

    def embed(self, texts: list[str]) -> Vectors:
        """One normalised row per text."""
        if self.delay_s:
            time.sleep(self.delay_s)
        self.embedded += texts
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                bucket = int.from_bytes(digest[:3], "little") % self.dim
                rows[i, bucket] += 1.0 if digest[3] & 1 else -1.0
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms == 0, 1, norms)
