"""The "I don't know" gate on a corpus: the calibrated threshold, then refusal rates on held-out questions.

Usage: python bench/idk_gate.py [--docs data/sample-docs] [--product Quillstack] [--model fake|local] [--lexical]
    [--answerable tests/fixtures/retrieval-questions.jsonl] [--unanswerable tests/fixtures/unanswerable-questions.jsonl]

In a fresh workspace it ingests --docs, generates questions (--model fake: the deterministic fake of the tests,
over loopback HTTP; local: the embedded SmolLM2-135M), builds the index and calibrates the threshold
(retrieval/calibrate.py). Then it scores held-out questions that calibration never saw: hand-written answerable
ones (JSONL with `question`) and hand-written unanswerable or off-topic ones (JSONL with `question`, `kind`), and
prints the share of each kind refused (relevance below the threshold), with the calibration's own rates beside.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.config import Settings, load_settings  # noqa: E402
from finetune_kit.errors import ExtraMissingError  # noqa: E402
from finetune_kit.pipeline import run_generate_questions  # noqa: E402
from finetune_kit.retrieval.answer import retrieve  # noqa: E402
from finetune_kit.retrieval.calibrate import calibrate  # noqa: E402
from finetune_kit.retrieval.index import update_index  # noqa: E402
from finetune_kit.retrieval.search import Retriever  # noqa: E402
from finetune_kit.retrieval.types import Embedder  # noqa: E402
from finetune_kit.stages.ingest import ingest  # noqa: E402
from finetune_kit.store import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=REPO / "data" / "sample-docs")
    parser.add_argument("--product", default="Quillstack")
    parser.add_argument("--model", choices=("fake", "local"), default="fake")
    parser.add_argument(
        "--lexical", action="store_true", help="index without vectors: the gate compares the best BM25 score"
    )
    parser.add_argument("--answerable", type=Path, default=REPO / "tests/fixtures/retrieval-questions.jsonl")
    parser.add_argument(
        "--unanswerable", type=Path, default=REPO / "tests/fixtures/unanswerable-questions.jsonl"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, endpoint(args.model):
        settings = load_settings(workspace=Path(tmp) / "ws", product=args.product, **provider(args.model))
        started = time.perf_counter()
        factory = lexical_only if args.lexical else None
        with Store(settings.db_path) as store:
            ingest(store, settings, [str(args.docs)], open_embedder=factory)
        run_generate_questions(settings)
        with Store(settings.db_path) as store:
            update_index(store, settings, open_embedder=factory)
            report = calibrate(store, settings, open_embedder=factory)
            print(f"calibration ({time.perf_counter() - started:.1f} s with ingest and questions):")
            print(json.dumps({"threshold": report.threshold} | report.stats(), indent=2))
            if report.threshold is not None:
                held_out(store, settings, report.threshold, args.answerable, args.unanswerable)


def held_out(
    store: Store, settings: Settings, threshold: float, answerable: Path, unanswerable: Path
) -> None:
    """Print the share of each held-out kind refused by the gate: relevance below `threshold`, or unknown terms."""
    retriever = Retriever.open(store, settings)
    kinds: dict[str, list[tuple[float, str, tuple[str, ...]]]] = defaultdict(list)
    for path in (answerable, unanswerable):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                kind = item.get("kind") or ("answerable" if item.get("answerable", True) else "unanswerable")
                found = retrieve(retriever, item["question"])
                kinds[kind].append((found.relevance or 0.0, item["question"], found.unknown))
    print(
        f"held-out questions at threshold {threshold:.4f} (and unknown terms: {retriever.settings.retrieval.refuse_unknown_terms}):"
    )
    for kind, scored in sorted(kinds.items()):
        refused = {q for s, q, unknown in scored if s < threshold or unknown}
        by_terms = sum(1 for s, q, unknown in scored if s >= threshold and unknown)
        low, high = min(scored)[0], max(scored)[0]
        print(
            f"  {kind:13} refused {len(refused):3d}/{len(scored):3d} = {len(refused) / len(scored):6.1%}"
            f"  ({by_terms} by unknown terms alone)",
            end="",
        )
        print(f"   relevance {low:.3f}–{high:.3f}")
        for score, question, unknown in sorted(scored):
            wrong = (question in refused) == (kind == "answerable")
            if wrong:
                verdict = "refused" if kind == "answerable" else "answered"
                print(f"      {verdict} {score:.3f} {question}  {list(unknown) or ''}")


def lexical_only(settings: Settings) -> Embedder:
    raise ExtraMissingError("--lexical: no embedder")


def provider(model: str) -> dict[str, str]:
    return {"provider": "openai", "model": "fake-model"} if model == "fake" else {"provider": "local"}


@contextlib.contextmanager
def endpoint(model: str) -> Iterator[None]:
    """The fake OpenAI server of the tests for --model fake (it writes negatives on request), else nothing."""
    if model != "fake":
        yield
        return
    from tests.fake_openai import FakeOpenAI, docs_responder

    with FakeOpenAI(docs_responder, api_key="sk-bench-0123456789") as fake:
        os.environ.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY="sk-bench-0123456789")
        yield


if __name__ == "__main__":
    main()
