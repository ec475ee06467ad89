"""Throughput at the limit with no tuning settings: `ftkit generate-questions` against slow, rate-limited fakes.

Usage: python bench/throughput.py [--runs 3] [--chunks 300] [--regime NAME ...] [--timeout-s 5.0] [--command run]

Regimes (no max_concurrency, requests_per_minute or tokens_per_minute is set; the client learns everything):
  fast-rpm   200 ms latency, 3,000 RPM cap
  slow-rpm   1.5 s latency, 6,000 RPM cap (a high usage tier: seconds of latency, thousands of requests a minute)
  tpm        500 ms latency, 6,000 RPM and a tokens-per-minute cap that binds first, fed ~400-word chunks
  faults     fast-rpm plus 20 % 429 with Retry-After, 5 % 500, 2 % timeouts, 5 % malformed; printed as the ratio
             of its time to fast-rpm's (the fault-free time)
For each regime: the median over --runs of the fraction of the bound, where the bound is the server's cap (the
requests, or the tokens it charged, divided by its rate per second) and the run's time is the whole stage's.
"pipelined" also grants the one latency no client can avoid (the last response's). The request timeout is
 --timeout-s, except in the fault mix, which is the one tests/test_fault_injection.py uses: a 1 s request
timeout (5 latencies), the injected timeouts holding their reply 2.5 s (a 5 s timeout alone would put 5 s on
the critical path of a 6 s job). The fake runs in a process of its own, as a real server would. `--command run`
times `ftkit run` end to end instead (questions, answers, their grounding judges, paraphrases and negatives; no
index, no training) on the ingested corpus.
"""

import argparse
import multiprocessing
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from typer.testing import CliRunner  # noqa: E402

from bench.common import environment  # noqa: E402
from finetune_kit.cli import app  # noqa: E402
from finetune_kit.config import Settings  # noqa: E402
from tests.fake_openai import FakeOpenAI, Faults, Reply, docs_responder  # noqa: E402

KEY = "bench-key"
QUESTIONS_PER_CHUNK = Settings.model_fields["questions_per_chunk"].default  # no setting changes it here
WORDS = [
    "server",
    "port",
    "config",
    "flag",
    "token",
    "cache",
    "index",
    "queue",
    "worker",
    "deploy",
    "bucket",
    "region",
    "proxy",
    "timeout",
    "retry",
    "schema",
    "webhook",
    "plugin",
    "widget",
    "cluster",
    "shard",
    "replica",
    "backup",
    "restore",
    "upload",
    "export",
    "import",
    "report",
    "billing",
    "invoice",
    "account",
    "tenant",
    "project",
    "branch",
    "release",
    "build",
    "artifact",
    "pipeline",
    "runner",
    "agent",
    "secret",
    "vault",
    "policy",
    "quota",
]


@dataclass(frozen=True)
class Regime:
    name: str
    latency_s: float
    rpm: int
    tpm: int | None = None
    words_per_chunk: int = 80
    faults: bool = False
    timeout_s: float | None = None  # the client's request timeout; None: --timeout-s


REGIMES = {
    "fast-rpm": Regime("fast-rpm", 0.2, 3000),
    "slow-rpm": Regime("slow-rpm", 1.5, 6000),
    "tpm": Regime("tpm", 0.5, 6000, tpm=600_000, words_per_chunk=380),
    "faults": Regime("faults", 0.2, 3000, faults=True, timeout_s=1.0),
}


COMMANDS = {  # what is timed, on the ingested corpus in `docs`
    "generate-questions": lambda docs: ["generate-questions"],
    "run": lambda docs: ["run", str(docs), "--no-index", "--no-train"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=300)
    parser.add_argument("--regime", action="append", choices=sorted(REGIMES), help="default: all")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=5.0,
        help="the client's request timeout (above the slowest latency)",
    )
    parser.add_argument("--command", choices=sorted(COMMANDS), default="generate-questions")
    return parser.parse_args()


def write_corpus(folder: Path, chunks: int, words: int, seed: int) -> None:
    """One Markdown file a chunk, each about its own made-up topic, so no two chunks share their questions."""
    rng = random.Random(seed)
    folder.mkdir()
    for i in range(chunks):
        topic = f"Module{i}"
        sentences, count = [f"# {topic}\n"], 0
        while count < words:
            sentence = (
                f"The {topic} {' '.join(rng.choices(WORDS, k=9))} option defaults to {rng.randint(1, 99)}."
            )
            sentences.append(sentence)
            count += len(sentence.split())
        (folder / f"m{i:04}.md").write_text(" ".join(sentences) + "\n")


@dataclass(frozen=True)
class Served:
    """What the fake counted: requests received, 429s from its caps, tokens charged, faults injected."""

    requests: int
    rate_limited: int
    tokens_charged: int
    injected: int


def serve(regime: Regime, faults: Faults | None, conn: Connection) -> None:
    """The fake in a process of its own, as a real server is: sharing the client's GIL would slow both."""

    def slow(body: dict) -> Reply:
        reply = docs_responder(body)
        return Reply(reply.content, delay_s=regime.latency_s)

    with FakeOpenAI(slow, api_key=KEY, rpm=regime.rpm, tpm=regime.tpm, faults=faults) as fake:
        conn.send(fake.url)
        conn.recv()  # the run is over
        conn.send(
            Served(
                len(fake.requests),
                fake.rate_limited,
                fake.tokens_charged,
                sum(fake.faults_injected.values()),
            )
        )


@contextmanager
def fake_server(regime: Regime, faults: Faults | None) -> Iterator[tuple[str, Connection]]:
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    process = multiprocessing.get_context("fork").Process(target=serve, args=(regime, faults, theirs))
    process.start()
    try:
        yield ours.recv(), ours
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()


def accounted(workspace: Path, command: str) -> dict[str, int]:
    """The books after a run: every active chunk has a question set (full, or with the reason it is short) and,
    after `ftkit run`, every accepted question one answer row; SystemExit naming what is missing otherwise."""
    with sqlite3.connect(workspace / "state.db") as db:
        chunks, without_set, short_unexplained, short = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE s.chunk_id IS NULL),"
            " count(*) FILTER (WHERE s.n_accepted < ? AND s.reason IS NULL),"
            " count(*) FILTER (WHERE s.reason IS NOT NULL)"
            " FROM chunks c LEFT JOIN question_sets s ON s.chunk_id = c.id WHERE c.status = 'active'",
            (QUESTIONS_PER_CHUNK,),
        ).fetchone()
        unanswered = db.execute(
            "SELECT count(*) FROM questions q WHERE q.status = 'accepted'"
            " AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.question_id = q.id)"
        ).fetchone()[0]
    db.close()
    missing = without_set + short_unexplained + (unanswered if command == "run" else 0)
    if missing:
        raise SystemExit(
            f"books do not balance: of {chunks} chunks {without_set} have no question set and"
            f" {short_unexplained} are short without a reason; {unanswered} accepted questions have no answer"
        )
    return {"chunks": chunks, "short": short}


def run_once(regime: Regime, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Ingest a corpus (untimed), then time `ftkit generate-questions` against a fake with the regime's caps."""
    timeout_s = regime.timeout_s or args.timeout_s
    faults = (
        Faults(
            rate_limited=0.2,
            server_error=0.05,
            timeout=0.02,
            malformed=0.05,
            seed=seed,
            retry_after_s=1.0,
            timeout_s=2.5 * timeout_s,
        )
        if regime.faults
        else None
    )
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp, fake_server(regime, faults) as (url, fake):
        workspace, docs = Path(tmp) / "ws", Path(tmp) / "docs"
        write_corpus(docs, args.chunks, regime.words_per_chunk, seed)
        env = {
            "OPENAI_BASE_URL": url,
            "OPENAI_API_KEY": KEY,
            "FTKIT_REQUEST_TIMEOUT_S": str(timeout_s),
            "FTKIT_MAX_RETRIES": "10",
            "FTKIT_RETRIEVAL_INDEX_ON_INGEST": "false",
        }
        with environment(env):
            ingested = runner.invoke(app, ["--workspace", str(workspace), "ingest", str(docs)])
            assert ingested.exit_code == 0, ingested.output
            start = time.perf_counter()
            result = runner.invoke(app, ["--workspace", str(workspace), *COMMANDS[args.command](docs)])
            wall_s = time.perf_counter() - start
        fake.send("stop")
        served: Served = fake.recv()
        assert result.exit_code == 0, result.output
        books = accounted(workspace, args.command)
        admitted = served.requests - served.rate_limited
        bound_s = served.tokens_charged / (regime.tpm / 60) if regime.tpm else admitted / (regime.rpm / 60)
        return {
            "wall_s": wall_s,
            "fraction": bound_s / wall_s,
            "pipelined": (bound_s + regime.latency_s) / wall_s,
            "requests": served.requests,
            "cap_429": served.rate_limited,
            "injected": served.injected,
            **books,
        }


def main() -> None:
    args = parse_args()
    names = args.regime or list(REGIMES)
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        regime = REGIMES[name]
        runs = [run_once(regime, args, seed) for seed in range(args.runs)]
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        m = medians[name]
        each = ", ".join(f"{run['fraction']:.3f}" for run in runs)
        print(
            f"{name:9} {args.command}: fraction of bound {m['fraction']:.3f} (pipelined {m['pipelined']:.3f});"
            f" wall {m['wall_s']:.2f} s; requests {m['requests']:.0f}; 429s from the cap {m['cap_429']:.0f};"
            f" injected faults {m['injected']:.0f}; chunks accounted for {m['chunks']:.0f}"
            f" ({m['short']:.0f} short, with reasons)  [runs: {each}]",
            flush=True,
        )
    if "faults" in medians and "fast-rpm" in medians:
        ratio = medians["faults"]["wall_s"] / medians["fast-rpm"]["wall_s"]
        print(f"fault mix: {ratio:.2f}x the fault-free time; throughput {1 / ratio:.2f} of fault-free")
    print(
        f"({args.chunks} chunks, median of {args.runs} runs, request timeout {args.timeout_s:g} s"
        " (the fault mix 1 s), no tuning)"
    )


if __name__ == "__main__":
    main()
