"""A full disk is one line naming the path and the space, leaves no temporary file, and a re-run completes.

The disks are real: a small tmpfs (mounting needs root, as in CI; the tests skip with the reason elsewhere),
SQLite's own page limit (`PRAGMA max_page_count`, which makes SQLite report SQLITE_FULL), and /dev/full.
"""

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.disk_space import human_size, is_disk_full
from finetune_kit.errors import DiskFullError
from finetune_kit.stages.dataset import Example, jsonl_bytes, to_record, validate_jsonl, write_jsonl
from finetune_kit.store import Store
from tests.conftest import REPO, SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, docs_responder

RECORDS = [
    to_record(Example(f"c{i}", f"How do I do thing {i}?", "Like so. " * 40), "chat", None) for i in range(60)
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs of its own, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Take all but `leave_bytes` of the disk's free space with one file; returns it (delete it to free the space)."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(0, free - leave_bytes))
    return filler


def ftkit(fake: FakeOpenAI, workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FTKIT_"))}
    env.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=TEST_KEY, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "finetune_kit", "--workspace", str(workspace), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


RUN = ("run", str(SAMPLE_DOCS), "--product", "Quillstack", "--no-train", "--no-index")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference_train_jsonl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """train.jsonl of a run on a disk with room to spare."""
    workspace = tmp_path_factory.mktemp("roomy")
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as fake:
        assert ftkit(fake, workspace, *RUN).returncode == 0
    return (workspace / "dataset" / "train.jsonl").read_text()


@pytest.mark.parametrize("leave_bytes", [0, 64_000, 300_000])
def test_a_full_disk_under_the_workspace_is_one_line_and_a_rerun_completes(
    small_disk: Path, leave_bytes: int, reference_train_jsonl: str
) -> None:
    workspace = small_disk / "ws"
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as fake:
        assert ftkit(fake, workspace, "ingest", str(SAMPLE_DOCS)).returncode == 0
        filler = fill(small_disk, leave_bytes)
        full = ftkit(fake, workspace, *RUN)
        line = one_error_line(full.stderr)
        assert full.returncode == 1
        assert f"{workspace / 'state.db'}: no space left on its disk (" in line
        assert " free) — free some space" in line
        assert "move it aside" not in line
        assert list(small_disk.rglob("*.tmp")) == []
        filler.unlink()
        with sqlite3.connect(workspace / "state.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rerun = ftkit(fake, workspace, *RUN)
    assert rerun.returncode == 0, rerun.stderr
    assert (workspace / "dataset" / "train.jsonl").read_text() == reference_train_jsonl


def test_a_full_dataset_disk_names_the_file_and_the_space_it_needs(small_disk: Path, tmp_path: Path) -> None:
    workspace, out = tmp_path / "ws", small_disk / "dataset"
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as fake:
        assert ftkit(fake, workspace, *RUN).returncode == 0
        needed = (workspace / "dataset" / "train.jsonl").stat().st_size
        filler = fill(small_disk, 4096)
        full = ftkit(fake, workspace, "build-dataset", "--out", str(out), "--product", "Quillstack")
        line = one_error_line(full.stderr)
        assert full.returncode == 1
        assert line.startswith(
            f"Error: {out / 'train.jsonl'}: no space left on its disk (needs {human_size(needed)}, "
        )
        assert list(small_disk.rglob("*.tmp")) == []
        filler.unlink()
        again = ftkit(fake, workspace, "build-dataset", "--out", str(out), "--product", "Quillstack")
    assert again.returncode == 0, again.stderr
    assert (out / "train.jsonl").read_bytes() == (workspace / "dataset" / "train.jsonl").read_bytes()


def test_a_database_on_a_full_disk_is_not_called_damaged(small_disk: Path) -> None:
    workspace = small_disk / "ws"
    with FakeOpenAI(docs_responder, api_key=TEST_KEY) as fake:
        assert ftkit(fake, workspace, "ingest", str(SAMPLE_DOCS)).returncode == 0
        fill(small_disk, 0)
        status = ftkit(fake, workspace, "status")
    line = one_error_line(status.stderr)
    assert status.returncode == 1
    assert line.startswith(f"Error: {workspace / 'state.db'}: no space left on its disk (")
    assert "move it aside" not in line


def test_write_jsonl_on_a_full_disk_keeps_the_old_file_and_no_temp(small_disk: Path) -> None:
    path = small_disk / "train.jsonl"
    write_jsonl(path, RECORDS[:1])
    old = path.read_bytes()
    fill(small_disk, 0)
    with pytest.raises(DiskFullError) as caught:
        write_jsonl(path, RECORDS)
    assert str(caught.value).startswith(
        f"{path}: no space left on its disk (needs {human_size(jsonl_bytes(RECORDS))}, "
    )
    assert path.read_bytes() == old
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "train.jsonl"]


def test_jsonl_bytes_is_what_write_jsonl_writes(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, RECORDS)
    assert path.stat().st_size == jsonl_bytes(RECORDS)
    assert validate_jsonl(path, 65_536).examples == len(RECORDS)


def test_sqlite_full_names_the_database_and_the_transaction_rolls_back(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        pages = store.scalar("PRAGMA page_count")
        store.db.execute(
            f"PRAGMA max_page_count = {pages + 2}"
        )  # SQLite itself reports SQLITE_FULL past this
        with pytest.raises(DiskFullError) as caught, store.transaction() as db:
            db.execute("INSERT INTO runs(command, started_at) VALUES ('big', 'now')")
            db.execute("UPDATE runs SET summary_json = ? WHERE command = 'big'", ("x" * 100_000,))
        assert str(caught.value).startswith(f"{tmp_path / 'state.db'}: no space left on its disk (")
        assert store.scalar("SELECT count(*) FROM runs") == 0
        assert store.scalar("PRAGMA integrity_check") == "ok"


def test_a_kernel_enospc_counts_as_a_full_disk() -> None:
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as caught:
        full.write(b"x")
    assert is_disk_full(caught.value)
    assert not is_disk_full(FileNotFoundError(2, "No such file or directory"))


def test_a_training_file_copied_onto_a_full_disk_names_the_copy_and_its_size(
    small_disk: Path, tmp_path: Path
) -> None:
    from finetune_kit.training.backend import DatasetFile
    from finetune_kit.training.local_backend import LocalBackend

    source = tmp_path / "train.jsonl"
    write_jsonl(source, RECORDS)
    fill(small_disk, 0)
    with Store(tmp_path / "state.db") as store, pytest.raises(DiskFullError) as caught:
        LocalBackend(store, small_disk / "ws").upload(DatasetFile(source, "ab" * 32))
    copy = small_disk / "ws" / "training" / "files" / f"file-local-{'ab' * 12}.jsonl"
    assert str(caught.value).startswith(
        f"{copy}: no space left on its disk (needs {human_size(source.stat().st_size)}, "
    )
    assert list((small_disk / "ws").rglob("*.partial")) == []


def test_a_trainer_that_ran_out_of_space_says_where(small_disk: Path) -> None:
    from finetune_kit.training.local_trainer import failure_reason

    output = small_disk / "job-output"
    output.mkdir()
    fill(small_disk, 0)
    with (output / "adapter.gguf").open("wb", buffering=0) as handle, pytest.raises(OSError) as writing:
        handle.write(b"\0" * 100_000)  # a failed write names no file: the job's output folder stands in
    assert failure_reason(writing.value, output).startswith(f"{output}: no space left on its disk (0 B free)")
    assert failure_reason(ValueError("bad\nthing"), output) == "ValueError: bad"
