"""One workspace, one writer: concurrent `ftkit run`s pay for each call once; a killed holder's lock is taken over."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finetune_kit.stages.dataset import validate_jsonl
from tests.conftest import REPO, SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply, docs_responder

HELD = 4  # requests the lock's holder keeps at the gate
LATENCY_S = 0.05  # long enough that runs started together overlap on the server


def slow_docs(body: dict) -> Reply:
    reply = docs_responder(body)
    reply.delay_s = LATENCY_S
    return reply


def ftkit(fake: FakeOpenAI, workspace: Path, *args: str, **settings: str) -> subprocess.Popen[str]:
    """A real `python -m finetune_kit` process on `workspace`, pointed at the fake, with these FTKIT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FTKIT_"))}
    env.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=TEST_KEY, PYTHONPATH=str(REPO), COLUMNS="200")
    env.update({f"FTKIT_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "finetune_kit", "--workspace", str(workspace), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ftkit_run(fake: FakeOpenAI, workspace: Path, **settings: str) -> subprocess.Popen[str]:
    return ftkit(
        fake,
        workspace,
        "run",
        str(SAMPLE_DOCS),
        "--product",
        "Quillstack",
        "--no-train",
        "--no-index",
        **settings,
    )


def ledger(db: Path) -> tuple[int, dict[str, int]]:
    """Rows in the cost ledger, and the calls each run recorded."""
    with sqlite3.connect(db) as conn:
        total = conn.execute("SELECT count(*) FROM llm_calls").fetchone()[0]
        per_run = dict(
            conn.execute("SELECT coalesce(run_id, 0), count(*) FROM llm_calls GROUP BY 1").fetchall()
        )
    return total, per_run


@pytest.fixture(scope="module")
def single_run_calls(tmp_path_factory: pytest.TempPathFactory) -> int:
    """How many calls the work takes: one run alone on a fresh workspace."""
    workspace = tmp_path_factory.mktemp("alone")
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as fake:
        assert ftkit_run(fake, workspace).wait(timeout=180) == 0
        return len(fake.requests)


@pytest.mark.parametrize("n_runs", [2, 4])
def test_concurrent_runs_pay_each_call_once(tmp_path: Path, n_runs: int, single_run_calls: int) -> None:
    workspace = tmp_path / "ws"
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as fake:
        processes = [ftkit_run(fake, workspace) for _ in range(n_runs)]
        outcomes = [process.communicate(timeout=300) for process in processes]
        served = len(fake.requests)
    for process, (_, err) in zip(processes, outcomes, strict=True):
        assert process.returncode == 0, err
        assert "Traceback" not in err
    assert served == single_run_calls
    total, _ = ledger(workspace / "state.db")
    assert total == served  # every paid call is in the ledger once
    for name in ("train", "validation"):
        report = validate_jsonl(workspace / "dataset" / f"{name}.jsonl", 65_536)
        assert report.errors == []
    assert report.examples > 0
    assert list(workspace.rglob("*.tmp")) == []


class Gate:
    """A responder that holds every request until the test opens the gate: a writer kept busy on purpose."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def __call__(self, body: dict) -> Reply:
        self.open.wait(timeout=120)
        return docs_responder(body)


def test_a_waiting_writer_names_the_holder(tmp_path: Path) -> None:
    workspace, gate = tmp_path / "ws", Gate()
    with FakeOpenAI(gate, api_key=TEST_KEY) as fake:
        # the holder may keep 4 requests in flight: the window would grow with the gate's silence
        first = ftkit_run(fake, workspace, max_concurrency=str(HELD))
        _wait_for(lambda: len(fake.requests) >= HELD, first)  # it holds the lock, its calls held at the gate
        second = ftkit_run(fake, workspace)
        said = first_stderr_line(second, timeout_s=60)
        requests_while_waiting = len(fake.requests)
        gate.open.set()
        _, first_err = first.communicate(timeout=180)
        _, second_err = second.communicate(timeout=180)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, said + second_err
    assert f"{workspace}: waiting for ftkit process {first.pid} (run, started " in said
    assert requests_while_waiting == HELD  # only the holder's requests reached the server


def test_readers_do_not_wait_for_the_writer(tmp_path: Path) -> None:
    workspace, gate = tmp_path / "ws", Gate()
    with FakeOpenAI(gate, api_key=TEST_KEY) as fake:
        writer = ftkit_run(fake, workspace)
        _wait_for(lambda: len(fake.requests) >= 1, writer)
        readers = [ftkit(fake, workspace, *args) for args in (["status"], ["sources"], ["models"])]
        try:
            outcomes = [reader.communicate(timeout=60) for reader in readers]  # the gate holds the writer
            still_writing = writer.poll() is None
        finally:
            gate.open.set()
        writer.communicate(timeout=180)
    assert still_writing
    for reader, (_, err) in zip(readers, outcomes, strict=True):
        assert reader.returncode == 0, err
        assert "waiting" not in err
    assert "run — running," in outcomes[0][0]


def test_a_killed_writer_leaves_no_lock_and_its_run_reads_interrupted(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as fake:
        killed = ftkit_run(fake, workspace)
        _wait_for(lambda: len(fake.requests) >= 5, killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        shown, _ = ftkit(fake, workspace, "status").communicate(timeout=60)
        rerun = ftkit_run(fake, workspace)
        _, err = rerun.communicate(timeout=180)
    assert "run 1" in shown and "run — interrupted," in shown
    assert rerun.returncode == 0, err
    assert "waiting for" not in err  # the kernel released the dead holder's lock
    with sqlite3.connect(workspace / "state.db") as conn:
        runs = conn.execute("SELECT id, status FROM runs ORDER BY id").fetchall()
    assert runs == [(1, "interrupted"), (2, "ok")]  # the next writer marked it for good


def test_the_lock_file_names_its_holder(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    with FakeOpenAI(slow_docs, api_key=TEST_KEY) as fake:
        writer = ftkit_run(fake, workspace)
        _wait_for(lambda: len(fake.requests) >= 3, writer)
        holder = json.loads((workspace / "writer.lock").read_text())
        writer.communicate(timeout=180)
    assert holder["pid"] == writer.pid
    assert holder["command"] == "run"


def first_stderr_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line a process writes to stderr, or "" if it writes none in time."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stderr.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    return line[0] if line else ""


def _wait_for(condition: object, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not condition() and process.poll() is None and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()


def test_a_migration_applied_by_another_process_meanwhile_is_not_applied_twice(tmp_path: Path) -> None:
    from finetune_kit.store import MIGRATIONS, Store, _statements

    path = tmp_path / "state.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    for name, sql in MIGRATIONS[:-1]:  # a database from the ftkit before the newest migration
        for statement in _statements(sql):
            other.execute(statement)
        other.execute("INSERT INTO migrations VALUES (?, 'then')", (name,))
    other.execute("BEGIN IMMEDIATE")  # another process is about to apply the newest migration
    outcome: list[BaseException | None] = []

    def open_store() -> None:
        try:
            Store(path).close()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    opener = threading.Thread(target=open_store)
    opener.start()
    time.sleep(1.0)  # the opener has read which migrations are done and now waits for the write lock
    name, sql = MIGRATIONS[-1]
    for statement in _statements(sql):
        other.execute(statement)
    other.execute("INSERT INTO migrations VALUES (?, 'now')", (name,))
    other.execute("COMMIT")
    opener.join(timeout=60)
    assert outcome == [None]
    assert other.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
