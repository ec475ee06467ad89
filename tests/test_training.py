"""`ftkit train` against a fake fine-tuning service over real HTTP: start, watch, re-attach, cancel, fail, register."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.cli import app
from finetune_kit.store import Store
from finetune_kit.training.backend import TrainingParams
from finetune_kit.training.jobs import start_job
from finetune_kit.training.openai_backend import OpenAIBackend
from finetune_kit.training.watch import Polling, watch_job
from tests.conftest import REPO, TEST_KEY
from tests.fake_openai import FakeOpenAI, spec_violation

EXAMPLE = {
    "messages": [
        {"role": "system", "content": "You are Quillstack's support assistant."},
        {"role": "user", "content": "How do I export a document?"},
        {"role": "assistant", "content": "Choose File, then Export."},
    ]
}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace holding a dataset of OpenAI's minimum size, and polling fast enough for tests."""
    dataset = tmp_path / "ws" / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "train.jsonl").write_text("".join(json.dumps(EXAMPLE) + "\n" for _ in range(10)))
    (dataset / "validation.jsonl").write_text(json.dumps(EXAMPLE) + "\n")
    monkeypatch.setenv("FTKIT_TRAINING_POLL_INTERVAL_S", "0.001")
    monkeypatch.setenv("FTKIT_TRAINING_MAX_POLL_INTERVAL_S", "0.01")
    return tmp_path / "ws"


def ftkit(workspace: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--workspace", str(workspace), *args])
    return result.exit_code, result.stdout, result.stderr


def rows(workspace: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(workspace / "state.db") as db:
        return db.execute(sql).fetchall()


def uploads(fake: FakeOpenAI) -> int:
    return fake.batch_api.calls.count("POST /v1/files")


@pytest.mark.parametrize("events_page_cap", [None, 2])
def test_watch_to_success_prints_each_event_once_in_order_and_registers_the_model(
    fake_llm: FakeOpenAI, workspace: Path, events_page_cap: int | None
) -> None:
    fake_llm.fine_tuning.events_page_cap = events_page_cap  # 2: the client must follow `after` cursors
    code, out, err = ftkit(workspace, "train", "--watch", "--suffix", "docs", "--seed", "7")
    assert (code, err) == (0, "")
    [job] = fake_llm.fine_tuning.jobs.values()
    assert job.status == "succeeded"
    lines = out.splitlines()
    messages = [e["message"] for e in job.events if e["type"] == "message"]
    positions = [[i for i, line in enumerate(lines) if line.endswith(" " + m)] for m in messages]
    assert all(len(found) == 1 for found in positions), out
    assert [found[0] for found in positions] == sorted(found[0] for found in positions)
    steps = [line for line in lines if line.startswith("step ")]
    assert steps == [f"step {n}/4  train loss {2 / n:.4f}  valid loss {2.2 / n:.4f}" for n in (1, 2, 3, 4)]
    assert "status: validating_files → queued" in lines and "status: running → succeeded" in lines
    assert any(line.startswith("estimated finish: ") for line in lines)
    assert f"Fine-tuned model: {job.fine_tuned_model} (registered; `ftkit models` lists it)" in lines
    [model] = rows(workspace, "SELECT name, backend, base_model, job_id, metrics_json FROM finetuned_models")
    assert model[:4] == (job.fine_tuned_model, "openai", "gpt-4o-mini-2024-07-18", job.id)
    assert json.loads(model[4]) | {"checkpoints": None} == {
        "steps": 4,
        "train_loss": 0.5,
        "valid_loss": 0.55,
        "trained_tokens": 4000,
        "checkpoints": None,
    }
    assert len(json.loads(model[4])["checkpoints"]) == 2
    assert rows(workspace, "SELECT step, train_loss, valid_loss FROM job_metrics ORDER BY step") == [
        (n, round(2 / n, 4), round(2.2 / n, 4)) for n in (1, 2, 3, 4)
    ]
    curve = workspace / "training" / f"{job.id}-loss.png"
    assert curve.read_bytes().startswith(b"\x89PNG") and f"Loss curve: {curve}" in lines
    assert rows(workspace, "SELECT COUNT(*) FROM job_events") == [(len(job.events),)]
    assert fake_llm.invalid_requests == []


def test_the_create_request_carries_method_metadata_and_files(fake_llm: FakeOpenAI, workspace: Path) -> None:
    args = [
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--learning-rate-multiplier",
        "0.5",
        "--base-model",
        "gpt-4o-mini",
    ]
    assert ftkit(workspace, "train", *args)[::2] == (0, "")
    [job] = fake_llm.fine_tuning.jobs.values()
    request = job.request
    assert request["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}},
    }
    assert request["model"] == "gpt-4o-mini" and "suffix" not in request and "seed" not in request
    files = {f.purpose: f for f in fake_llm.batch_api.files.values()}
    assert list(files) == ["fine-tune"]
    assert {request["training_file"], request["validation_file"]} == set(fake_llm.batch_api.files)
    [dataset] = rows(workspace, "SELECT dataset_hash FROM jobs")
    assert request["metadata"]["ftkit_dataset"] == dataset[0]
    assert spec_violation(job.as_object(), "FineTuningJob") is None


def test_training_twice_uploads_once_and_creates_one_job(fake_llm: FakeOpenAI, workspace: Path) -> None:
    code, first, _ = ftkit(workspace, "train")
    assert code == 0 and first.startswith("Started fine-tuning job ftjob-")
    code, second, _ = ftkit(workspace, "train")
    assert code == 0 and "already exists for this dataset and these parameters" in second
    assert (uploads(fake_llm), fake_llm.fine_tuning.created_jobs()) == (2, 1)
    assert ftkit(workspace, "train", "--seed", "1")[0] == 0  # new parameters: a new job on the same files
    assert (uploads(fake_llm), fake_llm.fine_tuning.created_jobs()) == (2, 2)
    assert rows(workspace, "SELECT COUNT(*) FROM training_files") == [(2,)]


def test_a_job_created_but_not_recorded_is_found_instead_of_created_again(
    fake_llm: FakeOpenAI, workspace: Path
) -> None:
    assert ftkit(workspace, "train")[0] == 0
    with sqlite3.connect(workspace / "state.db") as db:  # as if killed between the create call and its UPDATE
        db.execute("UPDATE jobs SET id = NULL, status = 'creating'")
    code, out, _ = ftkit(workspace, "train")
    assert code == 0 and "already exists" in out
    assert fake_llm.fine_tuning.created_jobs() == 1
    assert rows(workspace, "SELECT id FROM jobs") == [(next(iter(fake_llm.fine_tuning.jobs)),)]


def ftkit_process(fake: FakeOpenAI, workspace: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=fake.url, OPENAI_API_KEY=TEST_KEY, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "finetune_kit", "--workspace", str(workspace), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored_steps(workspace: Path) -> int:
    """Metrics rows the watch process has stored so far (0 while its database is still being created)."""
    if not (workspace / "state.db").exists():
        return 0
    try:
        return rows(workspace, "SELECT COUNT(*) FROM job_metrics")[0][0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_during_watch_then_watch_follows_the_same_job(fake_llm: FakeOpenAI, workspace: Path) -> None:
    fake_llm.fine_tuning.hold_at_step = 2
    process = ftkit_process(fake_llm, workspace, "train", "--watch")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if stored_steps(workspace) == 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    fake_llm.fine_tuning.hold_at_step = None
    code, out, err = ftkit(workspace, "train", "watch")
    assert (code, err) == (0, "")
    [job] = fake_llm.fine_tuning.jobs.values()
    assert out.startswith(f"Watching job {job.id} (running).")
    assert [line for line in out.splitlines() if line.startswith("step ")] == [
        "step 3/4  train loss 0.6667  valid loss 0.7333",
        "step 4/4  train loss 0.5000  valid loss 0.5500",
    ]
    assert (uploads(fake_llm), fake_llm.fine_tuning.created_jobs()) == (2, 1)
    assert rows(workspace, "SELECT id, status FROM jobs") == [(job.id, "succeeded")]
    assert rows(workspace, "SELECT COUNT(*) FROM job_events") == [(len(job.events),)]
    assert rows(workspace, "SELECT name FROM finetuned_models") == [(job.fine_tuned_model,)]


def test_ctrl_c_detaches_without_cancelling(fake_llm: FakeOpenAI, workspace: Path) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    with Store(workspace / "state.db") as store:
        backend = OpenAIBackend(fake_llm.url, TEST_KEY)
        started = start_job(store, backend, workspace / "dataset", TrainingParams("gpt-4o-mini"))
        with pytest.raises(KeyboardInterrupt):
            watch_job(
                store, backend, started.record, lambda update: None, Polling(sleep=interrupt), workspace
            )
    [job] = fake_llm.fine_tuning.jobs.values()
    assert job.status == "queued"
    assert not any(call.endswith("/cancel") for call in fake_llm.fine_tuning.calls)


def test_cancel_then_watch_reports_the_cancelled_job(fake_llm: FakeOpenAI, workspace: Path) -> None:
    assert ftkit(workspace, "train")[0] == 0
    [job] = fake_llm.fine_tuning.jobs.values()
    code, out, _ = ftkit(workspace, "train", "cancel")
    assert (code, out) == (0, f"Asked to cancel job {job.id}: now cancelled.\n")
    code, out, err = ftkit(workspace, "train", "watch", job.id)
    assert code == 1
    assert err == f"Error: fine-tuning job {job.id} was cancelled — change a parameter to start a new job\n"
    assert rows(workspace, "SELECT status FROM jobs") == [("cancelled",)]


def test_a_failed_job_exits_1_with_the_services_reason(fake_llm: FakeOpenAI, workspace: Path) -> None:
    fake_llm.fine_tuning.fail_at_step = 2
    code, out, err = ftkit(workspace, "train", "--watch")
    [job] = fake_llm.fine_tuning.jobs.values()
    assert code == 1
    assert err.startswith(
        f"Error: fine-tuning job {job.id} failed: Training file has 3 invalid examples. (invalid_training_file)"
    )
    assert "ERROR: Fine-tuning job failed: Training file has 3 invalid examples." in out
    assert rows(workspace, "SELECT status, error FROM jobs") == [
        ("failed", "Training file has 3 invalid examples. (invalid_training_file)")
    ]
    assert rows(workspace, "SELECT COUNT(*) FROM finetuned_models") == [(0,)]
    assert (workspace / "training" / f"{job.id}-loss.png").exists()


def test_permission_denied_explains_the_2026_closure(fake_llm: FakeOpenAI, workspace: Path) -> None:
    fake_llm.fine_tuning.deny_create = True
    code, _, err = ftkit(workspace, "train", "--watch")
    assert code == 1
    assert err.startswith(
        "Error: cannot create the fine-tuning job: HTTP 403: This organization does not have"
    )
    assert "OpenAI closed self-serve fine-tuning in 2026" in err and "Azure OpenAI" in err
    assert "--backend local" in err and len(err.splitlines()) == 1
    assert ftkit(workspace, "train", "watch")[2].startswith("Error: no fine-tuning job in ")


def test_missing_dataset_names_the_fix(fake_llm: FakeOpenAI, tmp_path: Path) -> None:
    code, _, err = ftkit(tmp_path / "empty", "train")
    assert code == 1
    assert (
        err
        == f"Error: {tmp_path / 'empty' / 'dataset' / 'train.jsonl'}: no training file — run `ftkit build-dataset` first, or pass --dataset DIR\n"
    )


def test_models_lists_the_registry_as_json(fake_llm: FakeOpenAI, workspace: Path) -> None:
    assert ftkit(workspace, "models", "--json")[1] == "[]\n"
    assert ftkit(workspace, "train", "--watch")[0] == 0
    [job] = fake_llm.fine_tuning.jobs.values()
    code, out, _ = ftkit(workspace, "models", "--json")
    [model] = json.loads(out)
    assert code == 0
    assert {k: model[k] for k in ("name", "backend", "base_model", "job_id")} == {
        "name": job.fine_tuned_model,
        "backend": "openai",
        "base_model": "gpt-4o-mini-2024-07-18",
        "job_id": job.id,
    }
    assert re.fullmatch(r"ds1:[0-9a-f]{16}", model["dataset_hash"])
    assert ftkit(workspace, "models")[1].count(job.fine_tuned_model) == 1


def test_a_job_nobody_watched_is_registered_by_models(fake_llm: FakeOpenAI, workspace: Path) -> None:
    assert ftkit(workspace, "train")[0] == 0  # started, not watched
    [job] = fake_llm.fine_tuning.jobs.values()
    for _ in range(20):  # the fake moves a job one state per retrieve: each `ftkit models` polls it once
        code, out, err = ftkit(workspace, "models", "--json")
        if json.loads(out):
            break
    assert code == 0 and job.status == "succeeded"
    [model] = json.loads(out)
    assert model["name"] == job.fine_tuned_model
    ended = datetime.fromtimestamp(max(e["created_at"] for e in job.events), UTC).isoformat(
        timespec="seconds"
    )
    assert model["created_at"] == ended  # when the job ended, not when somebody looked
    assert err == f"Job {job.id} succeeded while nobody watched: registered {job.fine_tuned_model}\n"
    assert rows(workspace, "SELECT COUNT(*) FROM job_events") == [(len(job.events),)]
    assert (workspace / "training" / f"{job.id}-loss.png").is_file()
    calls = len(fake_llm.fine_tuning.calls)
    assert ftkit(workspace, "models")[::2] == (0, "")
    assert len(fake_llm.fine_tuning.calls) == calls  # a settled job is not asked about again


def test_models_without_a_key_lists_the_registry_without_asking_the_service(
    fake_llm: FakeOpenAI, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ftkit(workspace, "train")[0] == 0
    calls = len(fake_llm.fine_tuning.calls)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ftkit(workspace, "models") == (
        0,
        "No fine-tuned models yet — `ftkit train --watch` registers them.\n",
        "",
    )
    assert len(fake_llm.fine_tuning.calls) == calls


def test_epochs_beyond_the_services_range_are_refused_before_any_upload(
    fake_llm: FakeOpenAI, workspace: Path
) -> None:
    code, _, err = ftkit(workspace, "train", "--epochs", "51")
    assert code == 1 and "epochs" in err and len(err.splitlines()) == 1
    assert uploads(fake_llm) == 0


def test_a_dataset_below_min_examples_is_refused_before_any_upload(
    fake_llm: FakeOpenAI, workspace: Path
) -> None:
    train = workspace / "dataset" / "train.jsonl"
    train.write_text(
        "".join(json.dumps(EXAMPLE) + "\n" for _ in range(9)) + "\n"
    )  # a blank line is no example
    code, out, err = ftkit(workspace, "train", "--watch")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {train}: only 9 training examples, fewer than min_examples (10; OpenAI accepts no fewer than 10)"
        " — build a bigger dataset (more documents or --questions-per-chunk), or lower --min-examples\n"
    )
    assert uploads(fake_llm) == 0 and fake_llm.fine_tuning.calls == []
    assert ftkit(workspace, "train", "--min-examples", "9")[0] == 0  # the setting, lowered, lets it through
    assert uploads(fake_llm) == 2


def test_the_library_trains_publishes_and_fails_as_the_cli_does(
    fake_llm: FakeOpenAI, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script calling `run_training` gets the same job, report, sink writes and failure as `ftkit train`."""
    from finetune_kit.config import load_settings
    from finetune_kit.errors import JobFailedError
    from finetune_kit.training import JobStarted, TrainingFinished, WatchStarted, run_training
    from tests.fake_airtable import API_KEY, BASE, FakeAirtable

    with FakeAirtable() as airtable:
        table = airtable.add_table("Models", ["Name", "Base model", "Job", "Dataset", "Created", "Metrics"])
        monkeypatch.setenv("AIRTABLE_API_KEY", API_KEY)
        monkeypatch.setenv("FTKIT_AIRTABLE_API_URL", airtable.url)
        settings = load_settings(workspace=workspace, airtable_models_table=f"{BASE}/Models")
        updates: list[object] = []
        outcome = run_training(settings, watch=True, on_update=updates.append)
        [job] = fake_llm.fine_tuning.jobs.values()
        assert outcome.result is not None and outcome.result.model is not None
        assert outcome.result.model.name == job.fine_tuned_model
        assert outcome.published == [f"Airtable: created model {job.fine_tuned_model} in {BASE}/Models"]
        assert [r["fields"]["Name"] for r in table.records] == [job.fine_tuned_model]
        kinds = [type(u) for u in updates]
        assert kinds[:2] == [JobStarted, WatchStarted] and kinds[-1] is TrainingFinished

        fake_llm.fine_tuning.fail_at_step = 2
        updates.clear()
        with pytest.raises(JobFailedError, match="Training file has 3 invalid examples"):
            run_training(
                settings.model_copy(update={"training": settings.training.model_copy(update={"seed": 5})}),
                watch=True,
                on_update=updates.append,
            )
        finished = updates[-1]
        assert isinstance(finished, TrainingFinished) and finished.outcome.result is not None
        assert finished.outcome.result.job.status == "failed"


def test_models_no_sync_reads_the_registry_and_asks_nothing(fake_llm: FakeOpenAI, workspace: Path) -> None:
    assert ftkit(workspace, "train")[0] == 0  # started, not watched
    calls, jobs = len(fake_llm.fine_tuning.calls), rows(workspace, "SELECT * FROM jobs")
    for _ in range(5):
        assert ftkit(workspace, "models", "--no-sync", "--json") == (0, "[]\n", "")
    assert len(fake_llm.fine_tuning.calls) == calls
    assert rows(workspace, "SELECT * FROM jobs") == jobs


def test_ask_and_registered_model_never_poll_the_service(fake_llm: FakeOpenAI, workspace: Path) -> None:
    from finetune_kit.config import load_settings
    from finetune_kit.slack.answerer import registered_model

    assert ftkit(workspace, "train")[0] == 0  # a hosted job nobody watched
    calls = len(fake_llm.fine_tuning.calls)
    assert registered_model(load_settings(workspace=workspace)) is None
    code, _, err = ftkit(workspace, "ask", "How do I export?")
    assert code == 1 and err.startswith(f"Error: no fine-tuned model in {workspace} yet")
    assert len(fake_llm.fine_tuning.calls) == calls


def test_ask_answers_with_a_registered_model_and_writes_nothing_to_airtable(
    fake_llm: FakeOpenAI, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_kit.training.registry import RegisteredModel, register_model
    from tests.fake_airtable import API_KEY, BASE, FakeAirtable

    model = RegisteredModel(
        "ft:gpt-4o-mini-2024-07-18:acme::q1",
        "openai",
        "gpt-4o-mini-2024-07-18",
        "ftjob-1",
        "ds1",
        "2026-05-01T00:00:00+00:00",
    )
    with Store(workspace / "state.db") as store:
        register_model(store, model)  # not in the models table yet: a sync would write it
    with FakeAirtable() as airtable:
        airtable.add_table("Models", ["Name", "Base model", "Job", "Dataset", "Created", "Metrics"])
        monkeypatch.setenv("AIRTABLE_API_KEY", API_KEY)
        monkeypatch.setenv("FTKIT_AIRTABLE_API_URL", airtable.url)
        monkeypatch.setenv("FTKIT_AIRTABLE_MODELS_TABLE", f"{BASE}/Models")
        code, out, err = ftkit(workspace, "ask", "How do I export a document?")
        assert (code, err) == (0, f"[{model.name}]\n") and out.strip()
        assert airtable.calls == []
