"""`ftkit eval` at the rate limit with no tuning settings: 100 questions x 4 arms against a slow, capped fake.

Usage: python bench/eval.py [--runs 3] [--questions 100] [--latency-s 0.2] [--rpm 3000]

The workspace is built as tests/test_eval.py builds it (untimed): the sample docs ingested and indexed with the
bundled embedder, and a --questions JSONL written from its chunks (a question, its reference and gold document
each). The fake answers as tests/test_eval.py's models do (base-model, ft-model, a judge-model), every reply
after --latency-s, behind a server-side cap of --rpm. No max_concurrency, requests_per_minute or
tokens_per_minute is set: the client learns the rate from the x-ratelimit headers.

For each run: the wall time of `ftkit eval` (answers, judge, claim checks, report), the rate-limit bound of the
calls it made ((calls - 1) / rate + latency: the last call cannot start before the cap allows it and takes one
latency; and the plain calls / rate), their ratio (target <= 1.2), then the calls a re-run of the same eval
makes (target 0). The median over --runs is printed last.
"""

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from typer.testing import CliRunner  # noqa: E402

from bench.common import environment  # noqa: E402
from finetune_kit.cli import app  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402
from tests.test_eval import EvalModels  # noqa: E402

KEY = "bench-key"
ARGS = ["--model", "base-model", "--ft-model", "ft-model", "--judge-model", "judge-model"]
ARGS += ["--product", "Quillstack", "--arms", "base,ft,rag,ft+rag", "--no-held-out", "--json"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--rpm", type=int, default=3000)
    return parser.parse_args()


def write_questions(workspace: Path, path: Path, n: int, models: EvalModels) -> None:
    """n questions from the workspace's chunks, each with the chunk's first sentence as its reference."""
    with sqlite3.connect(workspace / "state.db") as db:
        rows = db.execute(
            "SELECT c.heading_path, c.text, d.path FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE c.status = 'active' ORDER BY c.id"
        ).fetchall()
    lines = []
    for i in range(n):
        heading, text, doc = rows[i % len(rows)]
        topic = heading.split(" > ")[-1] if heading else doc
        question = f"What do the docs say about {topic}? (question {i + 1})"
        reference = " ".join(text.split()[:30])
        models.references[question] = reference
        lines.append(
            json.dumps({"id": f"q{i}", "question": question, "reference": reference, "gold_paths": [doc]})
        )
    path.write_text("\n".join(lines) + "\n")


def run_once(args: argparse.Namespace) -> dict[str, float]:
    models = EvalModels()
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(models, api_key=KEY, rpm=args.rpm) as fake:
        workspace, questions = Path(tmp) / "ws", Path(tmp) / "questions.jsonl"
        env = {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": KEY, "FTKIT_RETRIEVAL_INDEX_ON_INGEST": "true"}
        with environment(env):
            ingested = runner.invoke(
                app, ["--workspace", str(workspace), "ingest", str(REPO / "data" / "sample-docs")]
            )
            assert ingested.exit_code == 0, ingested.output
            write_questions(workspace, questions, args.questions, models)
            models.delay_s = args.latency_s
            command = ["--workspace", str(workspace), "eval", *ARGS, "--questions", str(questions)]
            start = time.perf_counter()
            result = runner.invoke(app, command)
            wall_s = time.perf_counter() - start
            assert result.exit_code == 0, result.output
            sent, limited = len(fake.requests), fake.rate_limited
            calls = sent - limited
            again = runner.invoke(app, command)
            assert again.exit_code == 0, again.output
            rerun_calls = len(fake.requests) - sent
    rate = args.rpm / 60
    bound_s = (calls - 1) / rate + args.latency_s
    return {
        "wall_s": wall_s,
        "calls": calls,
        "cap_429": limited,
        "bound_s": bound_s,
        "plain_bound_s": calls / rate,
        "ratio": wall_s / bound_s,
        "rerun_calls": rerun_calls,
    }


def main() -> None:
    args = parse_args()
    runs = []
    for i in range(args.runs):
        run = run_once(args)
        runs.append(run)
        print(
            f"run {i + 1}: wall {run['wall_s']:.2f} s; {run['calls']:.0f} calls ({run['cap_429']:.0f} 429s from"
            f" the cap); bound {run['bound_s']:.2f} s (calls/rate {run['plain_bound_s']:.2f} s);"
            f" wall/bound {run['ratio']:.3f}; re-run calls {run['rerun_calls']:.0f}",
            flush=True,
        )
    m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(
        f"median of {args.runs}: eval of {args.questions} questions x 4 arms, {args.latency_s * 1000:g} ms latency,"
        f" {args.rpm} RPM cap, no tuning: wall {m['wall_s']:.2f} s; {m['calls']:.0f} calls; bound"
        f" {m['bound_s']:.2f} s (calls/rate {m['plain_bound_s']:.2f} s); wall/bound {m['ratio']:.3f}"
        f" (target <= 1.2); re-run calls {m['rerun_calls']:.0f} (target 0)"
    )


if __name__ == "__main__":
    main()
