"""Local training is the `train` extra: without it ftkit does everything else, and says how to add it."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_kit.extras import TRAIN_MODULES, is_train_available, missing_modules, require_train
from tests.conftest import REPO, SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI

MISSING_TRAIN_LINE = (
    "Error: local training needs the train extra (torch, transformers, peft, trl not installed) — run"
    " `pip install 'finetune_kit[train]'` (in a clone: `pip install -e '.[train]'`)"
)
HIDDEN = ("torch", "transformers", "peft", "trl")

# Runs before the program: the path finder no longer finds `hidden`, as if it were not installed, and each
# lookup of a hidden module is appended to `log`.
HIDE = """
import sys
from importlib.machinery import PathFinder

class _Hidden(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {hidden!r}:
            with open({log!r}, "a") as lookups:
                lookups.write(name + "\\n")
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [_Hidden if finder is PathFinder else finder for finder in sys.meta_path]
"""
FTKIT = "from finetune_kit.cli import main\nsys.argv[0] = 'ftkit'\nmain()\n"


def python_without(
    hidden: tuple[str, ...], program: str, *args: str, log: Path
) -> subprocess.CompletedProcess[str]:
    """Run `program` in a fresh Python that cannot find the `hidden` modules, with this repository first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    source = HIDE.format(hidden=set(hidden), log=str(log)) + program
    return subprocess.run(
        [sys.executable, "-c", source, *args], capture_output=True, text=True, env=env, timeout=300
    )


def lookups(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_missing_modules_are_found_without_importing_them() -> None:
    assert missing_modules(("json", "ftkit_no_such_module", "sqlite3")) == ["ftkit_no_such_module"]
    assert is_train_available()  # the test extra pulls the train extra: these tests train for real
    require_train("local training")


def test_the_hider_hides_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "lookups"
    program = "try:\n    import torch\nexcept ModuleNotFoundError as exc:\n    print(exc)\nimport json\n"
    result = python_without(("torch",), program, log=log)
    assert result.stdout == "No module named 'torch'\n"
    assert lookups(log) == ["torch"]


def write_dataset(folder: Path) -> None:
    folder.mkdir(parents=True)
    example = {"messages": [{"role": "user", "content": "Port?"}, {"role": "assistant", "content": "7410."}]}
    (folder / "train.jsonl").write_text(json.dumps(example) + "\n")


def test_local_training_without_the_extra_is_one_line_and_keeps_state(tmp_path: Path) -> None:
    write_dataset(Path("ws/dataset"))
    result = python_without(
        HIDDEN, FTKIT, "--workspace", "ws", "train", "--min-examples", "1", log=tmp_path / "lookups"
    )
    assert (result.returncode, result.stderr) == (1, MISSING_TRAIN_LINE + "\n")
    assert result.stdout == ""
    with sqlite3.connect("ws/state.db") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM training_files").fetchone() == (0,)
    assert not Path("ws/training").exists()


def test_the_gguf_conversion_without_the_extra_names_the_install(tmp_path: Path) -> None:
    program = (
        "from finetune_kit.errors import ExtraMissingError\n"
        "from finetune_kit.training.gguf_lora import write_gguf_adapter\n"
        "try:\n    write_gguf_adapter(Path('adapter'), {}, Path('adapter.gguf'))\n"
        "except ExtraMissingError as exc:\n    print(exc)\n"
    )
    result = python_without(HIDDEN, "from pathlib import Path\n" + program, log=tmp_path / "lookups")
    expected = MISSING_TRAIN_LINE.removeprefix("Error: ").replace(
        "local training", "the GGUF conversion of a LoRA adapter"
    )
    assert result.stdout == expected + "\n", result.stderr


def test_a_base_install_generates_the_dataset_and_stops_before_training(
    fake_llm: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heavy = (*TRAIN_MODULES, "matplotlib")
    log = tmp_path / "lookups"
    args = ("--workspace", "ws", "run", str(SAMPLE_DOCS), "--product", "Quillstack")
    generated = python_without(heavy, FTKIT, *args, "--no-train", log=log)
    assert generated.returncode == 0, generated.stderr
    assert "Wrote ws/dataset/train.jsonl" in generated.stdout
    assert lookups(log) == []  # generating a dataset never even looks for torch, transformers or matplotlib
    dataset = Path("ws/dataset/train.jsonl").read_bytes()
    calls = len(fake_llm.requests)

    monkeypatch.setenv("FTKIT_TRAINING_BACKEND", "local")
    trained = python_without(HIDDEN, FTKIT, *args, "--train", log=log)
    assert (trained.returncode, trained.stderr) == (1, MISSING_TRAIN_LINE + "\n")
    assert "Wrote ws/dataset/train.jsonl" in trained.stdout
    assert Path("ws/dataset/train.jsonl").read_bytes() == dataset
    assert len(fake_llm.requests) == calls
    with sqlite3.connect("ws/state.db") as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_the_cli_imports_no_training_library(tmp_path: Path) -> None:
    log = tmp_path / "lookups"
    result = python_without((*TRAIN_MODULES, "matplotlib"), "import finetune_kit.cli\n", log=log)
    assert result.returncode == 0, result.stderr
    assert lookups(log) == []
