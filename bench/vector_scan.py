"""How far the dense side's numpy scan goes: one query's scores over N chunks, as `ftkit search` computes them.

Usage: python bench/vector_scan.py [--chunks 10000,100000,300000] [--windows-per-chunk 2] [--repeat 20]

Builds the in-memory index the retriever loads (random unit vectors of the bundled embedder's 384 dimensions,
`windows-per-chunk` windows per chunk, as stored BLOBs are read back) and times the real scoring code
(retrieval/search.py `_Scores`: the inner products, each chunk's best window, the top `fetch_k`), then prints the
median and p95 per query, the load time from BLOBs, and the matrix's memory.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.retrieval.search import _Dense, _mean_directions, _Scores  # noqa: E402

DIM = 384


def dense_index(chunks: int, per_chunk: int, rng: np.random.Generator) -> tuple[_Dense, float]:
    vectors = rng.standard_normal((chunks * per_chunk, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    blobs = [row.tobytes() for row in vectors]  # as the embeddings table holds them
    started = time.perf_counter()
    windows = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), DIM)
    starts = np.arange(0, len(blobs), per_chunk, dtype=np.intp)
    ids = [f"c{i}" for i in range(chunks)]
    d = _Dense(
        chunk_ids=ids,
        row_of={cid: i for i, cid in enumerate(ids)},
        starts=starts,
        windows=windows,
        spans=[(0, 0)] * len(blobs),
        chunk_vectors=_mean_directions(windows, starts),
    )
    return d, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="10000,100000,300000")
    parser.add_argument("--windows-per-chunk", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--fetch-k", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'chunks':>9} {'windows':>9} {'MB':>7} {'load s':>7} {'p50 ms':>7} {'p95 ms':>7}")
    for chunks in (int(n) for n in args.chunks.split(",")):
        d, load_s = dense_index(chunks, args.windows_per_chunk, rng)
        times = []
        for _ in range(args.repeat):
            q = rng.standard_normal(DIM).astype(np.float32)
            q /= np.linalg.norm(q)
            started = time.perf_counter()
            _Scores({}, d, q, args.fetch_k)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        mb = (d.windows.nbytes + d.chunk_vectors.nbytes) / 2**20
        print(
            f"{chunks:>9} {len(d.windows):>9} {mb:>7.0f} {load_s:>7.2f}"
            f" {statistics.median(times):>7.1f} {p95:>7.1f}"
        )


if __name__ == "__main__":
    main()
