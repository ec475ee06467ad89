"""Global options after the command, and one dataset folder for `run`, `build-dataset` and `train`."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from finetune_kit.cli import app
from tests.conftest import SAMPLE_DOCS
from tests.fake_openai import FakeOpenAI


def ftkit(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def uploaded_training_files(fake: FakeOpenAI) -> list[bytes]:
    return [f.data for f in fake.batch_api.files.values() if f.purpose == "fine-tune"]


def test_the_workspace_goes_after_the_command(fake_llm: FakeOpenAI) -> None:
    code, out, err = ftkit("run", str(SAMPLE_DOCS), "--product", "Quillstack", "-w", "ws")
    assert code == 0, err
    assert Path("ws/state.db").is_file() and Path("ws/dataset/train.jsonl").is_file()
    assert not Path(".ftkit").exists()
    assert "Wrote ws/dataset/train.jsonl" in out


def test_after_the_command_wins_over_before_it(fake_llm: FakeOpenAI) -> None:
    assert ftkit("--workspace", "ws", "ingest", str(SAMPLE_DOCS))[0] == 0
    assert ftkit("-w", "elsewhere", "sources", "--workspace", "ws")[0] == 0
    code, _, err = ftkit("-w", "ws", "sources", "-w", "elsewhere")
    assert (code, err) == (
        1,
        "Error: elsewhere: no ftkit workspace here — run `ftkit ingest DOCS` first or pass --workspace\n",
    )


@pytest.mark.parametrize("position", ["before", "after"])
def test_config_and_debug_go_either_side_of_a_subcommand(position: str, tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text('workspace = "from-config"\n')
    options = ["--config", str(config), "--debug"]
    args = [*options, "train", "watch"] if position == "before" else ["train", "watch", *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr  # --debug reached the error handler
    assert result.stderr.splitlines()[-1].startswith("Error: no fine-tuning job in from-config/state.db")


def test_train_watch_takes_the_workspace_after_the_subcommand(tmp_path: Path) -> None:
    code, _, err = ftkit("train", "watch", "-w", str(tmp_path / "ws"))
    assert code == 1 and err.startswith(f"Error: no fine-tuning job in {tmp_path / 'ws' / 'state.db'} yet")


def test_dataset_dir_in_ftkit_toml_is_where_run_writes_and_train_reads(
    fake_llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("ftkit.toml").write_text('dataset_dir = "my-data"\nproduct = "Quillstack"\n')
    monkeypatch.setenv("FTKIT_TRAIN_AFTER_DATASET", "true")
    monkeypatch.setenv("FTKIT_TRAINING_POLL_INTERVAL_S", "0.001")
    monkeypatch.setenv("FTKIT_TRAINING_MAX_POLL_INTERVAL_S", "0.01")
    code, out, err = ftkit("-w", "ws", "run", str(SAMPLE_DOCS))
    assert code == 0, err
    assert "Wrote my-data/train.jsonl" in out and not Path("ws/dataset").exists()
    assert uploaded_training_files(fake_llm) == [
        Path("my-data/train.jsonl").read_bytes(),
        Path("my-data/validation.jsonl").read_bytes(),
    ]
    code, out, _ = ftkit("-w", "ws", "train")  # train alone reads the same folder: the same job
    assert code == 0 and out.startswith("Job ") and "already exists" in out


def test_the_dataset_flag_names_one_folder_for_build_dataset_and_train(fake_llm: FakeOpenAI) -> None:
    assert ftkit("-w", "ws", "ingest", str(SAMPLE_DOCS))[0] == 0
    assert ftkit("-w", "ws", "generate-questions", "--product", "Quillstack")[0] == 0
    code, out, err = ftkit("-w", "ws", "build-dataset", "--product", "Quillstack", "--dataset", "flagged")
    assert code == 0, err
    assert "Wrote flagged/train.jsonl" in out and not Path("ws/dataset").exists()
    assert ftkit("-w", "ws", "train", "--dataset", "flagged")[0] == 0
    assert len(fake_llm.fine_tuning.jobs) == 1
    assert uploaded_training_files(fake_llm)[0] == Path("flagged/train.jsonl").read_bytes()


def test_an_old_flat_key_in_ftkit_toml_is_shown_as_one_warning_line(tmp_path: Path) -> None:
    Path("ftkit.toml").write_text("slack_temperature = 0.5\n")
    code, _, err = ftkit("train", "watch", "-w", str(tmp_path / "ws"))
    assert code == 1
    assert err.splitlines()[0] == (
        "Warning: ftkit.toml: slack_temperature is now [slack] temperature — move it into that table"
    )


def test_a_parameter_named_group_underscore_key_sets_that_tables_key() -> None:
    from finetune_kit.cli import _settings
    from finetune_kit.config import Settings

    Path("ftkit.toml").write_text("[training]\nseed = 1\nlora_rank = 4\n[slack]\nport = 7\n")
    probe, seen = typer.Typer(), []

    @probe.command()
    def show(
        ctx: typer.Context, slack_temperature: float = 0.5, lora_rank: int = 8, training_seed: int = 9
    ) -> None:
        seen.append(_settings(ctx))

    assert CliRunner().invoke(probe, []).exit_code == 0
    settings: Settings = seen[0]
    assert (settings.slack.temperature, settings.slack.port) == (0.5, 7)
    assert (settings.training.lora_rank, settings.training.seed) == (8, 9)
