"""A re-run on an unchanged corpus makes 0 LLM calls: `ftkit run` twice against a fake OpenAI server on loopback.

Usage: python bench/rerun_calls.py
Prints the HTTP requests the fake server received during each run.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.cli import app  # noqa: E402
from tests.fake_openai import FakeOpenAI, docs_responder  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as ws, FakeOpenAI(docs_responder, api_key="bench-key") as fake:
        os.environ.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY="bench-key")
        args = ["--workspace", ws, "run", str(REPO / "data" / "sample-docs"), "--product", "Quillstack"]
        for label in ("first run", "unchanged re-run"):
            before, start = len(fake.requests), time.perf_counter()
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.stderr
            print(f"{label}: {len(fake.requests) - before} LLM calls, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
