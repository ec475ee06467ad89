"""all-MiniLM-L6-v2 in numpy (finetune_kit/retrieval/minilm.py) against sentence-transformers on PyTorch.

Usage: python bench/embedder.py [--windows 32] [--runs 3]
Prints, for each engine, the median of `runs`: the load time (a fresh process, from its first import to its
first vector), windows/s for a batch of full 256-token windows of the sample docs, one short query's latency,
and the lowest cosine between the engine's vectors and sentence-transformers' for the same windows.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOAD = """
import time
started = time.perf_counter()
{load}
embed(["warm"])
print(time.perf_counter() - started)
"""
NUMPY = """
from finetune_kit.retrieval.minilm import MiniLMEmbedder
embed = MiniLMEmbedder(blas_threads={threads}).embed
"""
TORCH = """
from sentence_transformers import SentenceTransformer
from finetune_kit.retrieval.minilm import model_dir
model = SentenceTransformer(str(model_dir()), device="cpu")
embed = lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True)
"""
THROUGHPUT = """
import json, statistics, sys, time
from pathlib import Path
import numpy as np
{load}
from finetune_kit.retrieval.minilm import MAX_WINDOW_TOKENS, MiniLMEmbedder
corpus = "\\n\\n".join(p.read_text() for p in sorted(Path({docs!r}).rglob("*.md")))
windows = [w for w in MiniLMEmbedder().windows(corpus, MAX_WINDOW_TOKENS, 0) if len(w) > 400][:{n}]
while len(windows) < {n}:
    windows += windows[: {n} - len(windows)]
embed(windows[:2])
rates, queries = [], []
for _ in range({runs}):
    started = time.perf_counter()
    vectors = np.asarray(embed(windows))
    rates.append(len(windows) / (time.perf_counter() - started))
    started = time.perf_counter()
    embed(["How do I rotate an SDK key?"])
    queries.append(time.perf_counter() - started)
np.save({out!r}, vectors)
print(json.dumps({{"rate": statistics.median(rates), "query_ms": 1000 * statistics.median(queries)}}))
"""
ENGINES = {
    "numpy, 1 BLAS thread (default)": NUMPY.format(threads=1),
    "numpy, BLAS's own threads": NUMPY.format(threads=None),
    "sentence-transformers": TORCH,
}


def child(program: str) -> str:
    """The stdout of `program` run in a fresh Python with this repository first on the path."""
    env = {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=os.environ | env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    """Measure each engine and print one line for it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="windows per timed batch")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import numpy as np

    vectors: dict[str, np.ndarray] = {}
    results: dict[str, tuple[float, dict[str, float]]] = {}
    for name, load in ENGINES.items():
        loads = [float(child(LOAD.format(load=load))) for _ in range(args.runs)]
        out = str(REPO / "bench" / f".embedder-{len(vectors)}.npy")
        docs = str(REPO / "data" / "sample-docs")
        program = THROUGHPUT.format(load=load, docs=docs, n=args.windows, runs=args.runs, out=out)
        results[name] = (statistics.median(loads), json.loads(child(program)))
        vectors[name] = np.load(out)
        Path(out).unlink()
    reference = vectors["sentence-transformers"]
    print(f"{args.windows} windows of 256 tokens (the sample docs), median of {args.runs}:")
    for name, (load_s, timing) in results.items():
        cosine = float((vectors[name] * reference).sum(axis=1).min())
        print(
            f"  {name:32s} load {load_s:5.2f} s   {timing['rate']:6.2f} windows/s"
            f"   query {timing['query_ms']:6.1f} ms   min cosine vs sentence-transformers {cosine:.6f}"
        )


if __name__ == "__main__":
    main()
