"""Slack bot responsiveness under a burst of mentions: ack latency and time to the placeholder.

Usage: python bench/slack_latency.py [--mentions 50] [--model-latency-ms 500] [--concurrency 4] [--runs 3]
Each run starts `ftkit slack` (HTTP mode) in its own process, as deployed, against a fake Slack Web API and a fake
model served by this script on 127.0.0.1 (each answer takes --model-latency-ms). After one warm-up question, every
mention is posted at once, signed as Slack signs it. Ack latency: until the bot's HTTP response (Slack wants it
within 3 s). Time to placeholder: from posting the event until the fake Slack receives the bot's chat.postMessage.
"""

import argparse
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fake_openai import FakeOpenAI, Reply  # noqa: E402
from tests.fake_slack import BOT_TOKEN, BOT_USER, SIGNING_SECRET, FakeSlack, post_event  # noqa: E402

KEY = "bench-key"
CHANNEL = "CBENCH001"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mentions", type=int, default=50)
    parser.add_argument("--model-latency-ms", type=float, default=500.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextlib.contextmanager
def running_bot(workspace: Path, slack: FakeSlack, model: FakeOpenAI, concurrency: int) -> Iterator[str]:
    """`ftkit slack` in its own process; yields its events URL, stops it with Ctrl-C."""
    env = os.environ | {
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack.url,
        "OPENAI_BASE_URL": model.url,
        "OPENAI_API_KEY": KEY,
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "finetune_kit", "-w", str(workspace), "slack", "--port", "0"]
    command += ["--concurrency", str(concurrency)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Listening for Slack events at "), line
        yield line.split(" at ")[1].split(",")[0]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def wait_for_answers(db_path: Path, count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            if (
                db.execute("SELECT COUNT(*) FROM slack_answers WHERE status != 'pending'").fetchone()[0]
                >= count
            ):
                return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} answers after {timeout_s} s")


def burst(mentions: int, slack: FakeSlack, url: str) -> tuple[list[float], list[float], float]:
    """Post every mention at once: (ack latencies, times to placeholder, when the first was sent)."""
    payloads = []
    for n in range(mentions):
        event = slack.user_says(CHANNEL, f"<@{BOT_USER}> question {n}")
        payloads.append(slack.envelope({**event, "type": "app_mention"}))
    sent: dict[str, float] = {}
    acks: list[float] = []
    start = threading.Barrier(mentions)

    def send(payload: dict) -> None:
        start.wait()
        sent[payload["event"]["ts"]] = time.monotonic()
        status, _, seconds = post_event(url, payload)
        assert status == 200, status
        acks.append(seconds)

    senders = [threading.Thread(target=send, args=(payload,)) for payload in payloads]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        placeholders = {c.args["thread_ts"]: c.at for c in slack.calls_to("chat.postMessage")}
        if all(ts in placeholders for ts in sent):
            return acks, [placeholders[ts] - at for ts, at in sent.items()], min(sent.values())
        time.sleep(0.01)
    raise TimeoutError("placeholders missing")


def one_run(args: argparse.Namespace) -> tuple[float, float, float, float, float]:
    """Ack p50/p95 and placeholder p50/p95 in ms, and seconds until every answer is written."""
    delay = args.model_latency_ms / 1000
    with (
        FakeSlack() as slack,
        FakeOpenAI(lambda body: Reply("An answer.", delay_s=delay), api_key=KEY) as model,
        tempfile.TemporaryDirectory() as workspace,
        running_bot(Path(workspace), slack, model, args.concurrency) as url,
    ):
        db_path = Path(workspace) / "state.db"
        burst(1, slack, url)  # warm-up: the first event opens the bot's connection pools
        wait_for_answers(db_path, 1)
        acks, placeholders, began = burst(args.mentions, slack, url)
        wait_for_answers(db_path, args.mentions + 1)
        done = time.monotonic() - began
    return (
        statistics.median(acks) * 1000,
        percentile(acks, 0.95) * 1000,
        statistics.median(placeholders) * 1000,
        percentile(placeholders, 0.95) * 1000,
        done,
    )


def main() -> None:
    args = parse_args()
    print(
        f"{args.mentions} concurrent mentions, model latency {args.model_latency_ms:g} ms, "
        f"concurrency {args.concurrency}, {args.runs} runs, {os.cpu_count()} cores"
    )
    print(
        f"{'run':>4} {'ack p50':>9} {'ack p95':>9} {'placeholder p50':>16} {'placeholder p95':>16} {'all answered':>13}"
    )
    rows = []
    for run in range(1, args.runs + 1):
        row = one_run(args)
        rows.append(row)
        print(
            f"{run:>4} {row[0]:>7.1f}ms {row[1]:>7.1f}ms {row[2]:>14.1f}ms {row[3]:>14.1f}ms {row[4]:>12.2f}s"
        )
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    print(
        f"median of {args.runs} runs: ack p50 {medians[0]:.1f} ms, p95 {medians[1]:.1f} ms (target < 100 ms); "
        f"placeholder p50 {medians[2]:.1f} ms, p95 {medians[3]:.1f} ms (target < 500 ms); "
        f"all answered in {medians[4]:.2f} s"
    )


if __name__ == "__main__":
    main()
