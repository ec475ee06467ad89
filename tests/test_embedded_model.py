"""The real embedded model (llama.cpp + the bundled SmolLM2 GGUF), end to end. Slow: marked, still run in CI."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.procs import pid_alive
from finetune_kit.stages.dataset import validate_jsonl
from tests.conftest import TINY_DOCS

pytestmark = pytest.mark.slow
RUN = ["--workspace", "ws", "run", str(TINY_DOCS), "--product", "Quillstack", "--min-examples", "1"]


@pytest.fixture(autouse=True)
def _no_grounding_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the pipeline on the real model; the 135M model's answers to the two-file corpus
    name things its chunks do not, so the grounding check (tested with a fake in test_grounding.py) keeps none."""
    monkeypatch.setenv("FTKIT_GROUNDING_PRECHECK", "false")
    monkeypatch.setenv("FTKIT_GROUNDING_JUDGE", "false")


def llm_calls(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0])


def test_run_on_the_embedded_model_writes_valid_jsonl_and_reruns_for_free(runner: CliRunner) -> None:
    result = runner.invoke(app, RUN)
    assert result.exit_code == 0, result.stderr
    for name in ("train", "validation"):
        report = validate_jsonl(Path(f"ws/dataset/{name}.jsonl"), token_limit=2048)
        assert report.errors == [] and report.over_limit == 0
    assert validate_jsonl(Path("ws/dataset/train.jsonl"), 2048).examples >= 1
    assert not Path("ws/llama-server.json").exists()  # the server it started is stopped
    calls = llm_calls(Path("ws/state.db"))
    assert calls >= 4

    again = runner.invoke(app, RUN)
    assert again.exit_code == 0, again.stderr
    assert llm_calls(Path("ws/state.db")) == calls
    assert "│ LLM calls (made / cached)             │ 0 / 0" in again.stdout  # nothing left to ask


def test_kill_9_mid_run_then_rerun_completes_without_repeating_calls(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "finetune_kit", *RUN]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FTKIT_")) or "GROUNDING" in k}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        not Path("ws/state.db").exists() or llm_calls(Path("ws/state.db")) < 3
    ):
        time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    paid = llm_calls(Path("ws/state.db"))
    orphan = json.loads(Path("ws/llama-server.json").read_text())["pid"]  # the server outlived its owner

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    made = int(second.stdout.split("LLM calls (made / cached)")[1].split("│")[1].split("/")[0])
    assert llm_calls(Path("ws/state.db")) == paid + made  # every stored call was reused, none made twice
    with sqlite3.connect("ws/state.db") as db:
        assert db.execute("SELECT count(*) FROM chunks WHERE status = 'active'").fetchone()[0] == 4
        sets = db.execute("SELECT chunk_id, count(*) FROM question_sets GROUP BY chunk_id").fetchall()
    assert len(sets) == 4 and all(n == 1 for _, n in sets)
    assert not pid_alive(orphan)  # the orphaned server was adopted and stopped
