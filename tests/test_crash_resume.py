"""kill -9 at several points, then re-run: the run completes, nothing is lost or duplicated, nothing paid twice."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder


def slow_docs(body: dict) -> Reply:
    reply = docs_responder(body)
    reply.delay_s = 0.02
    return reply


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


def stored_requests(db_path: Path) -> set[str]:
    if not db_path.exists():
        return set()
    with sqlite3.connect(db_path) as db:
        return {canonical(json.loads(row[0])) for row in db.execute("SELECT request_json FROM llm_calls")}


def ftkit_run(fake: FakeOpenAI, workspace: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FTKIT_"))}
    env.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=TEST_KEY, PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "finetune_kit",
        "--workspace",
        str(workspace),
        "run",
        str(SAMPLE_DOCS),
        "--product",
        "Quillstack",
        "--no-train",  # this is about the data stages; training's kill -9 is tested in test_training.py
        "--no-index",  # and the index's in test_retrieval_index.py
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_requests(fake: FakeOpenAI, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(fake.requests) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted_train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The training file of a run nobody killed."""
    workspace = tmp_path_factory.mktemp("reference")
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as reference:
        assert ftkit_run(reference, workspace).wait(timeout=120) == 0
    return (workspace / "dataset" / "train.jsonl").read_text()


@pytest.mark.parametrize("kill_after", [[1], [3, 40], [10, 60, 95]])
def test_kill_9_anywhere_then_rerun(
    tmp_path: Path, kill_after: list[int], uninterrupted_train_jsonl: str
) -> None:

    workspace, db = tmp_path / "ws", tmp_path / "ws" / "state.db"
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as fake:
        for point in kill_after:
            process = ftkit_run(fake, workspace)
            wait_for_requests(fake, point, process)
            process.send_signal(signal.SIGKILL)
            process.wait()
        paid_before_last_start, sent_before = stored_requests(db), len(fake.requests)
        final = ftkit_run(fake, workspace)
        _, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
        resent = {canonical(body) for body in fake.requests[sent_before:]} & paid_before_last_start
        assert resent == set()  # no call whose result was stored was made again

        sent_by_then = len(fake.requests)
        assert ftkit_run(fake, workspace).wait(timeout=60) == 0
        assert len(fake.requests) == sent_by_then  # an unchanged re-run makes zero calls
    assert (workspace / "dataset" / "train.jsonl").read_text() == uninterrupted_train_jsonl
    with sqlite3.connect(db) as conn:
        assert (
            conn.execute("SELECT count(*) FROM question_sets").fetchone()[0]
            == conn.execute("SELECT count(*) FROM chunks WHERE status = 'active'").fetchone()[0]
        )
        duplicated = conn.execute(
            "SELECT count(*) FROM (SELECT chunk_id, seq FROM questions GROUP BY 1, 2 HAVING count(*) > 1)"
        ).fetchone()[0]
    assert duplicated == 0
