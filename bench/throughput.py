"""Throughput at the limit: LLMClient against a rate-limited, slow, optionally faulty fake OpenAI server.

Usage: python bench/throughput.py [--requests 1000] [--latency-ms 200] [--server-rpm 3000] [--concurrency 16]
                                  [--learn] [--rate-limited 0.2 --server-errors 0.05 --timeouts 0.02 --malformed 0.05]
Prints the achieved requests/s as a fraction of the ideal bound, min(concurrency / latency, RPM / 60).
By default the client is told the server's RPM; --learn leaves it unset, so it learns it from the headers.
"""

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient  # noqa: E402
from finetune_kit.store import Store  # noqa: E402
from tests.fake_openai import FakeOpenAI, Faults, Reply  # noqa: E402

KEY = "bench-key"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--server-rpm", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--learn", action="store_true", help="do not configure requests_per_minute")
    parser.add_argument(
        "--timeout-s", type=float, default=5.0, help="client timeout; injected timeouts wait 2x"
    )
    parser.add_argument("--max-retries", type=int, default=10)
    for fault in ("rate-limited", "server-errors", "timeouts", "malformed"):
        parser.add_argument(f"--{fault}", type=float, default=0.0, metavar="FRACTION")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def distinct_requests(n: int) -> list[ChatRequest]:
    """n requests that differ only in their seed, so none is a cache hit."""
    base = ChatRequest(
        stage="bench",
        messages=(("user", "Write three questions about the Acme CLI's --port flag."),),
        temperature=0.7,
        max_tokens=64,
        template_version="bench",
    )
    return [dataclasses.replace(base, attempt=i + 1) for i in range(n)]


async def run_requests(url: str, store: Store, args: argparse.Namespace) -> LLMClient:
    """Send every request through one client and wait for all of them."""
    endpoint = Endpoint(base_url=url, api_key=KEY, model="gpt-4o-mini", identity="bench")
    client = LLMClient(
        endpoint,
        store,
        max_concurrency=args.concurrency,
        max_retries=args.max_retries,
        timeout_s=args.timeout_s,
        requests_per_minute=None if args.learn else args.server_rpm,
    )
    try:
        await asyncio.gather(*(client.chat(r) for r in distinct_requests(args.requests)))
    finally:
        await client.close()
    return client


def main() -> None:
    args = parse_args()
    latency_s = args.latency_ms / 1000
    faults = Faults(
        rate_limited=args.rate_limited,
        server_error=args.server_errors,
        timeout=args.timeouts,
        malformed=args.malformed,
        seed=args.seed,
        timeout_s=2 * args.timeout_s,
    )

    def slow_answer(body: dict) -> Reply:
        return Reply(
            "1. What does --port do?\n2. What is its default?\n3. Can it be set in a file?", delay_s=latency_s
        )

    with (
        tempfile.TemporaryDirectory() as workspace,
        Store(Path(workspace) / "state.db") as store,
        FakeOpenAI(slow_answer, api_key=KEY, rpm=args.server_rpm, faults=faults) as fake,
    ):
        start = time.perf_counter()
        client = asyncio.run(run_requests(fake.url, store, args))
        wall_s = time.perf_counter() - start
    ideal = min(args.concurrency / latency_s, args.server_rpm / 60)
    achieved = args.requests / wall_s
    print(
        f"config: {args.requests} requests, {args.latency_ms:g} ms latency, server cap {args.server_rpm} RPM,"
        f" max_concurrency {args.concurrency},"
        f" requests_per_minute {'learned from headers' if args.learn else args.server_rpm}, faults {faults}"
    )
    print(f"wall time: {wall_s:.2f} s; achieved {achieved:.1f} req/s; ideal bound {ideal:.1f} req/s")
    print(f"fraction of ideal: {achieved / ideal:.3f}")
    print(
        f"HTTP requests: {len(fake.requests)}; 429 from the RPM cap: {fake.rate_limited};"
        f" faults injected: {dict(fake.faults_injected)}; limits paced for: {client.limiter.limits};"
        f" final share: {client.limiter.share:.2f}"
    )


if __name__ == "__main__":
    main()
