"""Ingest + chunk throughput and peak memory on a generated Markdown tree of at least 2 MB.

Usage: python bench/ingest_chunk.py [--mb 2.5] [--runs 3]
Prints MB/s, documents/s, chunks, peak RSS and the time of an unchanged re-ingest for each run, then the median.
"""

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (REPO / "data" / "sample-docs" / "guides" / "configuration.md").read_text().split()


def paragraph(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def document(rng: random.Random, i: int) -> str:
    parts = [f"# Topic {i}\n", paragraph(rng, 60)]
    for s in range(rng.randint(3, 7)):
        parts.append(f"\n## Section {i}.{s}\n")
        parts += [paragraph(rng, rng.randint(30, 120)) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.5:
            parts.append(
                "```python\n"
                + "\n".join(f"value_{k} = compute({k})" for k in range(rng.randint(3, 30)))
                + "\n```"
            )
        if rng.random() < 0.3:
            parts.append(
                "| setting | default |\n| --- | --- |\n" + "\n".join(f"| `s{k}` | {k} |" for k in range(8))
            )
        for t in range(rng.randint(0, 2)):
            parts.append(f"\n### Detail {t}\n")
            parts.append(paragraph(rng, rng.randint(20, 80)))
    return "\n\n".join(parts) + "\n"


def make_tree(root: Path, megabytes: float) -> int:
    rng = random.Random(0)
    total, i = 0, 0
    while total < megabytes * 1_000_000:
        path = root / f"section-{i % 20}" / f"page-{i}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = document(rng, i)
        path.write_text(text)
        total += len(text.encode())
        i += 1
    return total


CHILD = """
import resource, sys, time
from pathlib import Path
from finetune_kit.config import load_settings
from finetune_kit.pipeline import run_ingest
settings = load_settings(workspace=Path(sys.argv[2]))
start = time.perf_counter()
report = run_ingest(settings, [sys.argv[1]])
elapsed = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
again = run_ingest(settings, [sys.argv[1]])
assert again.documents_new == 0 and again.chunks_new == 0
print(elapsed, report.documents_new, report.chunks_new, peak_mb, time.perf_counter() - start)
"""


def one_run(tree: Path) -> tuple[float, int, int, float, float]:
    with tempfile.TemporaryDirectory() as ws:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tree), ws], capture_output=True, text=True, check=True
        )
    elapsed, docs, chunks, peak, rerun = out.stdout.split()
    return float(elapsed), int(docs), int(chunks), float(peak), float(rerun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=2.5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "docs"
        size = make_tree(tree, args.mb)
        print(f"corpus: {size / 1e6:.2f} MB of Markdown in {len(list(tree.rglob('*.md')))} files")
        rates = []
        for run in range(args.runs):
            elapsed, docs, chunks, peak, rerun = one_run(tree)
            rates.append(size / 1e6 / elapsed)
            print(
                f"run {run + 1}: {elapsed:.2f} s, {size / 1e6 / elapsed:.2f} MB/s, {docs / elapsed:.0f} docs/s, "
                f"{chunks} chunks, peak RSS {peak:.0f} MB; unchanged re-ingest {rerun:.2f} s"
            )
        print(f"median: {statistics.median(rates):.2f} MB/s over {args.runs} runs (fresh workspace each)")


if __name__ == "__main__":
    main()
