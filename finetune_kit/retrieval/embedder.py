"""Which embedder the index uses: the bundled all-MiniLM-L6-v2, or any model behind an OpenAI-compatible
`/v1/embeddings` (OpenAI, Azure's v1 API, vLLM, Ollama, llama.cpp's server with --embeddings)."""

import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune_kit import tokens
from finetune_kit.config import Settings
from finetune_kit.errors import ConfigError, LLMError
from finetune_kit.retrieval.minilm import MAX_WINDOW_TOKENS, MODEL_NAME, MiniLMEmbedder, window_spans
from finetune_kit.retrieval.types import Embedder, Vectors

if TYPE_CHECKING:
    from finetune_kit.llm.api import Wording

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"  # as llm/endpoint.py, which this must not import (slow)
API_WINDOW_TOKENS = 512  # cl100k tokens per window for an API model unless [retrieval] window_tokens says
API_BATCH_SIZE = 128  # inputs per request: well inside OpenAI's 2,048 inputs and 300,000 tokens
MAX_CHARS_PER_TOKEN = 32  # more than any but freak cl100k tokens: bounds the text a window's tokens can span
_LONG_RUN = re.compile(r"\S{256}")  # as tokens.py: BPE on one long pre-token is quadratic, so runs are cut


def open_embedder(settings: Settings) -> Embedder:
    """The embedder `[retrieval] embedding_model` names; the local model's weights load on first use."""
    if settings.retrieval.embedding_model == MODEL_NAME:
        return MiniLMEmbedder(_local_window(settings))
    return APIEmbedder.from_settings(settings)


def embedder_key(settings: Settings) -> str:
    """The key an index built with these settings carries (model@window), without loading anything."""
    model = settings.retrieval.embedding_model
    window = _local_window(settings) if model == MODEL_NAME else _api_window(settings)
    return f"{model}@{window}"


def _local_window(settings: Settings) -> int:
    window = settings.retrieval.window_tokens
    if window is not None and window > MAX_WINDOW_TOKENS:
        raise ConfigError(
            f"[retrieval] window_tokens = {window} is more than {MODEL_NAME} reads ({MAX_WINDOW_TOKENS} tokens)"
            f" — set it to {MAX_WINDOW_TOKENS} or less, or leave it unset"
        )
    return window or MAX_WINDOW_TOKENS


def _api_window(settings: Settings) -> int:
    return settings.retrieval.window_tokens or API_WINDOW_TOKENS


class APIEmbedder:
    """A model at an OpenAI-compatible `/v1/embeddings`; tokens are counted offline with cl100k (tokens.py)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        window_tokens: int = API_WINDOW_TOKENS,
        max_retries: int = 4,
        timeout_s: float = 120.0,
        batch_size: int = API_BATCH_SIZE,
    ) -> None:
        from finetune_kit.llm.api import ApiCall, RetryPolicy, sync_client  # openai loads only when used

        self.model = model
        self.window_tokens = window_tokens
        self.key = f"{model}@{window_tokens}"
        self.batch_size = batch_size
        self._call = ApiCall(base_url, api_key, _wording(), model=model, doing="embedding")
        self._policy = RetryPolicy(max_retries)
        self._sdk = sync_client(base_url, api_key, timeout_s=timeout_s)
        self._dim: int | None = None
        self.requests = 0  # HTTP requests that returned vectors

    @classmethod
    def from_settings(cls, settings: Settings) -> "APIEmbedder":
        """The endpoint is `[retrieval] embedding_base_url`, else the generation endpoint's (OPENAI_BASE_URL)."""
        base_url = (
            settings.retrieval.embedding_base_url or settings.openai_base_url or OPENAI_DEFAULT_BASE_URL
        ).rstrip("/")
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        if key is None and base_url == OPENAI_DEFAULT_BASE_URL:
            raise ConfigError(
                f"embedding_model '{settings.retrieval.embedding_model}' is asked of {base_url}, which needs an API"
                f" key — export OPENAI_API_KEY, set [retrieval] embedding_base_url, or use embedding_model ="
                f" '{MODEL_NAME}' (local)"
            )
        return cls(
            base_url,
            key or "not-needed",
            settings.retrieval.embedding_model,
            window_tokens=_api_window(settings),
            max_retries=settings.max_retries,
            timeout_s=settings.request_timeout_s,
        )

    @property
    def dim(self) -> int:
        """The model's vector size, learned from its first answer (one short request if asked before any)."""
        if self._dim is None:
            self.embed(["dimensions"])
        assert self._dim is not None
        return self._dim

    @dim.setter
    def dim(self, value: int) -> None:
        """The vector size when known in advance, which spares the probe request."""
        self._dim = value

    def count_tokens(self, text: str) -> int:
        """cl100k tokens in `text`: a close, offline estimate for the models an endpoint serves."""
        return tokens.count_tokens(text)

    def windows(self, text: str, size: int, overlap: int) -> list[str]:
        """`text` cut into character slices of at most `size` tokens that cover it, neighbours sharing `overlap`."""
        return [text[start:end] for start, end in self.window_spans(text, size, overlap)]

    def window_spans(self, text: str, size: int, overlap: int) -> list[tuple[int, int]]:
        """The (start, end) characters of each window of `text`; no character is split between two."""
        starts = _token_starts(text)
        return window_spans(text, starts, starts, size, overlap, self.count_tokens)

    def embed(self, texts: list[str]) -> Vectors:
        """One L2-normalised row per text, `batch_size` texts per request, each cut to `window_tokens`."""
        rows = [
            self._embed_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)
        ]
        if not rows:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        return np.concatenate(rows)

    def _embed_batch(self, texts: list[str]) -> Vectors:
        # The API refuses an empty string; a longer text than the window is cut, as the local model cuts (a
        # token has at most a few dozen characters, so cutting characters first keeps BPE's work bounded).
        cap = self.window_tokens * MAX_CHARS_PER_TOKEN
        inputs = [tokens.truncate_tokens(t[:cap], self.window_tokens) or " " for t in texts]
        payload: dict[str, Any] = {"model": self.model, "input": inputs, "encoding_format": "float"}
        from finetune_kit.llm.api import request_sync

        response = request_sync(lambda: self._sdk.embeddings.create(**payload), self._call, self._policy)
        self.requests += 1
        ordered = sorted(response.data, key=lambda item: item.index)
        if len(ordered) != len(inputs):
            raise LLMError(
                f"{self._call.url} returned {len(ordered)} embeddings for {len(inputs)} inputs — check that"
                f" '{self.model}' is an embedding model"
            )
        log.debug("embedded %d inputs with %s at %s", len(inputs), self.model, self._call.url)
        vectors = np.array([item.embedding for item in ordered], dtype=np.float32)
        self._dim = vectors.shape[1]
        norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors / norms

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._sdk.close()


def _token_starts(text: str) -> list[int]:
    """The character where each cl100k token of `text` starts (long runs cut as tokens.py cuts them)."""
    encoding = tokens._encoding()
    starts: list[int] = []
    for begin, piece in _pieces(text):
        offset = 0
        char_of_byte = _char_of_byte(piece)
        for token in encoding.encode(piece):
            starts.append(begin + char_of_byte[offset])
            offset += len(encoding.decode_bytes([token]))
    return starts


def _pieces(text: str) -> Iterator[tuple[int, str]]:
    """(start, piece) of `text` cut after each run of 256 non-space characters."""
    begin = 0
    for match in _LONG_RUN.finditer(text):
        yield begin, text[begin : match.end()]
        begin = match.end()
    if begin < len(text) or not text:
        yield begin, text[begin:]


def _char_of_byte(text: str) -> list[int]:
    """For each UTF-8 byte offset of `text` (and its end), the character it falls in."""
    index: list[int] = []
    for i, char in enumerate(text):
        index.extend([i] * len(char.encode()))
    return [*index, len(text)]


def _wording() -> "Wording":
    """How embedding failures read (built on first use: llm/api.py imports the openai SDK, ~0.7 s)."""
    from finetune_kit.llm.api import Wording

    return Wording(
        refused_key="{url} rejected the API key (401) — check OPENAI_API_KEY",
        unreachable="cannot reach the embeddings endpoint {url}{tries} — check [retrieval] embedding_base_url"
        " (else OPENAI_BASE_URL) and that the server is up, then re-run (stored embeddings are kept)",
        forbidden="{url} refused the request (HTTP 403): {message} — check that the key may use model '{model}'",
        not_found=f"embedding model '{{model}}' not found at {{url}} — set [retrieval] embedding_model to a model"
        f" it serves, or to {MODEL_NAME} (local)",
        rejected="{url} rejected the embeddings request (HTTP {status}): {message}",
        failed="{url} answered HTTP {status}{tries}: {message} — re-run later (stored embeddings are kept)",
    )
