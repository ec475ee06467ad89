"""The local LoRA backend: detached trainer processes, their failures and cancellation, the GGUF adapter, serving.

The fast tests run real trainer processes that stop early (bad input, kill -9, cancel); the slow ones train
SmolLM2 for real, serve the adapter through llama.cpp and compare it with transformers + PEFT.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_kit.config import LOCAL_MODEL_ALIAS, load_settings
from finetune_kit.llm.local_server import ServedAdapter, served_adapters, server_config
from finetune_kit.procs import pid_alive
from finetune_kit.slack.answerer import registered_model
from finetune_kit.store import Store
from finetune_kit.training.backend import TrainingParams
from finetune_kit.training.jobs import start_job
from finetune_kit.training.local_backend import LocalBackend, add_event
from finetune_kit.training.local_trainer import LORA_TARGETS
from finetune_kit.training.sync import settle_jobs
from tests.conftest import REPO
from tests.test_training import ftkit, rows

EXAMPLES = [
    ("How do I export a document?", "Choose File, then Export, then pick PDF or Markdown."),
    ("How do I rotate an SDK key?", "Run `quill token rotate --sdk` and deploy the new key within 24 hours."),
    ("Where are flags stored?", "Flags live in the Quillstack server's Postgres database, one row per flag."),
    (
        "How do I roll back a flag change?",
        "Open the flag's History tab and click Restore on the version you want.",
    ),
]
SYSTEM = "You are a helpful technical support assistant for Quillstack."


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace with a four-example dataset (one for validation) and fast polling."""
    dataset = tmp_path / "ws" / "dataset"
    dataset.mkdir(parents=True)
    (dataset / "train.jsonl").write_text("".join(json.dumps(chat(*pair)) + "\n" for pair in EXAMPLES[:3]))
    (dataset / "validation.jsonl").write_text(json.dumps(chat(*EXAMPLES[3])) + "\n")
    monkeypatch.setenv("FTKIT_MIN_EXAMPLES", "1")  # a tiny dataset keeps real training short
    monkeypatch.setenv("FTKIT_TRAINING_POLL_INTERVAL_S", "0.05")
    monkeypatch.setenv("FTKIT_TRAINING_MAX_POLL_INTERVAL_S", "0.2")
    return tmp_path / "ws"


def stored_steps(workspace: Path) -> int:
    try:
        return int(rows(workspace, "SELECT COUNT(*) FROM job_metrics")[0][0])
    except sqlite3.OperationalError:  # the watcher has not created the state DB yet
        return 0


def wait_for(condition, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_max_length_is_part_of_what_a_local_job_is(workspace: Path) -> None:
    from finetune_kit.training import training_params

    settings = load_settings(workspace=workspace, training_backend="local", training_max_length=256)
    assert training_params(settings).max_length == 256
    longer = settings.model_copy(
        update={"training": settings.training.model_copy(update={"max_length": 512})}
    )
    assert training_params(longer) != training_params(settings)
    hosted = load_settings(workspace=workspace, training_backend="openai", training_max_length=256)
    assert (
        training_params(hosted).max_length is None
    )  # not a hosted parameter: the hosted job key is unchanged


def test_run_trains_by_default_only_on_the_local_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTKIT_TRAIN_AFTER_DATASET")
    assert load_settings().trains_after_dataset  # no key: local LoRA, free and offline
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert load_settings().trains_after_dataset  # a vLLM or Ollama URL without a key fine-tunes nothing
    assert load_settings().resolved_training_backend == "local"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    assert load_settings().resolved_training_backend == "openai"
    assert not load_settings().trains_after_dataset  # a hosted job costs money: only with --train
    assert load_settings(train_after_dataset=True).trains_after_dataset


def test_training_params_keep_their_key_when_the_lora_fields_are_unset() -> None:
    params = TrainingParams("gpt-4o-mini", n_epochs=3)
    assert params.to_json() == (
        '{"base_model": "gpt-4o-mini", "batch_size": null, "learning_rate_multiplier": null, "n_epochs": 3,'
        ' "seed": null, "suffix": null}'
    )
    local = TrainingParams(LOCAL_MODEL_ALIAS, lora_rank=8)
    assert json.loads(local.to_json())["lora_rank"] == 8
    assert TrainingParams.from_json(local.to_json()) == local


def test_a_local_job_started_before_the_lora_defaults_were_settings_keeps_its_key(workspace: Path) -> None:
    from finetune_kit.training import training_params
    from finetune_kit.training.jobs import job_key

    params = training_params(load_settings(workspace=workspace, training_backend="local"))
    assert (params.lora_rank, params.lora_alpha) == (16, 32)  # the settings spell the defaults out now
    before = TrainingParams(
        LOCAL_MODEL_ALIAS, n_epochs=3, max_length=1024
    )  # as started while they were unset
    assert job_key("local", "dataset", params) == job_key(
        "local", "dataset", before
    )  # `ftkit train` re-attaches
    ranked = TrainingParams(LOCAL_MODEL_ALIAS, n_epochs=3, lora_rank=8, max_length=1024)
    assert job_key("local", "dataset", ranked) != job_key("local", "dataset", before)


def test_a_malformed_dataset_line_is_refused_before_any_job_starts(workspace: Path) -> None:
    train = workspace / "dataset" / "train.jsonl"
    train.write_text(train.read_text() + '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    code, _, err = ftkit(workspace, "train", "--backend", "local")
    assert code == 1
    assert err == (
        f"Error: {train}:4: expected chat `messages` ending with an assistant turn, or `prompt` and `completion`"
        " — rebuild it with `ftkit build-dataset`, or fix that line\n"
    )
    assert rows(workspace, "SELECT COUNT(*) FROM local_jobs") == [(0,)]


def test_an_unknown_base_model_names_what_the_local_backend_takes(workspace: Path) -> None:
    code, _, err = ftkit(workspace, "train", "--backend", "local", "--base-model", "meta-llama/Llama-3.2-1B")
    assert code == 1
    assert err.startswith("Error: --base-model meta-llama/Llama-3.2-1B: not a GGUF file nor a Hugging Face")
    assert "it never downloads from a hub" in err


def test_a_crashing_trainer_fails_the_job_with_its_error(workspace: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like a checkpoint folder, holds no model
    code, out, err = ftkit(workspace, "train", "--watch", "--backend", "local", "--base-model", str(broken))
    [(job_id, error)] = rows(workspace, "SELECT id, error FROM jobs")
    assert code == 1
    assert error.startswith("ValueError: ") or error.startswith("OSError: "), error
    assert err.startswith(f"Error: fine-tuning job {job_id} failed: {error}")
    assert "status: validating_files → failed" in out or "status: running → failed" in out
    assert rows(workspace, "SELECT status FROM local_jobs") == [("failed",)]
    assert rows(workspace, "SELECT COUNT(*) FROM finetuned_models") == [(0,)]


def test_a_trainer_killed_with_9_is_reported_failed_not_running_forever(workspace: Path) -> None:
    assert ftkit(workspace, "train", "--backend", "local")[0] == 0
    [(job_id, pid)] = rows(workspace, "SELECT id, pid FROM local_jobs")
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid))
    code, _, err = ftkit(workspace, "train", "watch")
    assert code == 1
    assert err.startswith(
        f"Error: fine-tuning job {job_id} failed: the trainer process stopped without finishing"
    )
    assert err.endswith(" — run `ftkit train` again to restart it\n")
    assert rows(workspace, "SELECT status FROM jobs") == [("failed",)]
    # the job did not fail for a reason of its own: running `ftkit train` again starts it again
    code, out, _ = ftkit(workspace, "train", "--backend", "local")
    assert code == 0 and out.startswith("Started fine-tuning job ") and job_id not in out
    [first, second] = rows(workspace, "SELECT status FROM jobs ORDER BY created_at, rowid")
    assert first == ("failed",) and second[0] in ("validating_files", "queued")
    assert ftkit(workspace, "train", "cancel")[0] == 0


def test_after_a_kill_9_one_rerun_of_train_restarts_the_job(workspace: Path) -> None:
    assert ftkit(workspace, "train", "--backend", "local")[0] == 0
    [(job_id, pid)] = rows(workspace, "SELECT id, pid FROM local_jobs")
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid))
    code, out, _ = ftkit(workspace, "train", "--backend", "local")  # no watch saw it die: train asks first
    assert code == 0 and out.startswith("Started fine-tuning job ") and job_id not in out
    statuses = rows(workspace, "SELECT status FROM jobs ORDER BY created_at, rowid")
    assert len(statuses) == 2 and statuses[0] == ("failed",)
    assert ftkit(workspace, "train", "cancel")[0] == 0


def test_cancel_stops_the_trainer_and_watch_reports_it(workspace: Path) -> None:
    assert ftkit(workspace, "train", "--backend", "local")[0] == 0
    [(job_id, pid)] = rows(workspace, "SELECT id, pid FROM local_jobs")
    code, out, _ = ftkit(workspace, "train", "cancel")
    assert (code, out) == (0, f"Asked to cancel job {job_id}: now cancelled.\n")
    wait_for(lambda: not pid_alive(pid))
    code, _, err = ftkit(workspace, "train", "watch", job_id)
    assert code == 1
    assert err == f"Error: fine-tuning job {job_id} was cancelled — change a parameter to start a new job\n"
    assert rows(workspace, "SELECT status FROM local_jobs") == [("cancelled",)]
    assert ftkit(workspace, "train", "--backend", "local")[1].startswith(f"Job {job_id} already exists")


def test_further_processes_of_a_multi_gpu_launch_report_nothing(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`training_launcher` starts the trainer (as `accelerate launch` would); a process with RANK 1 stays silent."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    monkeypatch.setenv("FTKIT_TRAINING_LAUNCHER", json.dumps(["env", "RANK=1", sys.executable]))
    code, _, err = ftkit(workspace, "train", "--watch", "--backend", "local", "--base-model", str(broken))
    assert code == 1
    assert "failed: the trainer process stopped without finishing" in err
    [created, died] = [message for (message,) in rows(workspace, "SELECT message FROM local_job_events")]
    assert created == rows(workspace, "SELECT 'Created fine-tuning job: ' || id FROM local_jobs")[0][0]
    assert died.startswith("Training failed: the trainer process stopped without finishing (")  # the watch's


def test_a_launcher_that_is_not_installed_is_named(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTKIT_TRAINING_LAUNCHER", '["no-such-accelerate", "launch"]')
    code, _, err = ftkit(workspace, "train", "--backend", "local")
    assert code == 1
    assert err == (
        "Error: training_launcher no-such-accelerate: cannot start it (No such file or directory) — install it or"
        " fix the training_launcher setting\n"
    )
    monkeypatch.delenv("FTKIT_TRAINING_LAUNCHER")
    [(job_id,)] = rows(workspace, "SELECT id FROM local_jobs")
    code, out, _ = ftkit(workspace, "train", "--backend", "local")  # fixed: a new job, not the dead one
    assert code == 0 and job_id not in out
    assert rows(workspace, "SELECT COUNT(*) FROM local_jobs") == [(2,)]
    assert ftkit(workspace, "train", "cancel")[0] == 0  # leave no trainer behind


def test_a_reused_pid_is_not_mistaken_for_the_trainer(workspace: Path) -> None:
    with Store(workspace / "state.db") as store:
        backend = LocalBackend(store, workspace)
        started = start_job(store, backend, workspace / "dataset", TrainingParams(LOCAL_MODEL_ALIAS))
        job_id = started.record.id
        pid = store.scalar("SELECT pid FROM local_jobs WHERE id = ?", (job_id,))
        os.killpg(pid, signal.SIGKILL)
        # this test process is alive, but it started at another time than the recorded trainer
        store.db.execute(
            "UPDATE local_jobs SET pid = ?, pid_started = '1' WHERE id = ?", (os.getpid(), job_id)
        )
        job = backend.retrieve_job(job_id)
    assert job.status == "failed"
    assert job.error is not None and job.error.startswith("the trainer process stopped without finishing")


def test_the_embedded_server_serves_each_succeeded_local_model(workspace: Path, tmp_path: Path) -> None:
    base, adapter = tmp_path / "base.gguf", tmp_path / "ftjob-local-1" / "adapter.gguf"
    adapter.parent.mkdir()
    base.write_bytes(b"GGUF")
    adapter.write_bytes(b"GGUF")
    with Store(workspace / "state.db") as store:
        store.db.execute(
            """INSERT INTO local_jobs(id, status, base_model, base_gguf, params_json, options_json, metadata_json,
                   train_file, output_dir, fine_tuned_model, created_at, updated_at)
               VALUES ('ftjob-local-1', 'succeeded', 'x', ?, '{}', '{}', '{}', 't', ?, 'ft:x:local::1', 'a', 'a')""",
            (str(base), str(adapter.parent)),
        )
        assert served_adapters(store) == [ServedAdapter("ft:x:local::1", base, adapter)]
    settings = load_settings(workspace=workspace, local_model_path=base)
    models = server_config(settings, base)["models"]
    assert [(m["model_alias"], m.get("lora_path")) for m in models] == [
        (LOCAL_MODEL_ALIAS, None),
        ("ft:x:local::1", str(adapter)),
    ]
    adapter.unlink()  # a model whose adapter is gone is not offered
    assert [m["model_alias"] for m in server_config(settings, base)["models"]] == [LOCAL_MODEL_ALIAS]


def finished_unwatched_job(store: Store, workspace: Path, job_id: str, base_gguf: Path | None) -> str:
    """A local job whose trainer succeeded while no watch ran: rows as start_job and the trainer leave them."""
    name = f"ft:x:local::{job_id[-1]}"
    output = workspace / "training" / job_id
    output.mkdir(parents=True)
    params = TrainingParams(LOCAL_MODEL_ALIAS).to_json()
    store.db.execute(
        """INSERT INTO jobs(key, id, backend, status, base_model, dataset_hash, params_json, train_file_id,
               created_at, updated_at) VALUES (?, ?, 'local:ftkit', 'running', ?, 'ds1:x', ?, 'f', ?, ?)""",
        (f"ftj1:{job_id}", job_id, LOCAL_MODEL_ALIAS, params, job_id, job_id),
    )
    store.db.execute(
        """INSERT INTO local_jobs(id, status, base_model, base_gguf, params_json, options_json, metadata_json,
               train_file, output_dir, fine_tuned_model, trained_tokens, created_at, updated_at)
           VALUES (?, 'succeeded', ?, ?, ?, '{}', '{}', 't', ?, ?, 99, ?, ?)""",
        (
            job_id,
            LOCAL_MODEL_ALIAS,
            str(base_gguf) if base_gguf else None,
            params,
            str(output),
            name,
            job_id,
            job_id,
        ),
    )
    add_event(
        store, job_id, "Step 1/1: training loss=1.5000", data={"step": 1, "total_steps": 1, "train_loss": 1.5}
    )
    if base_gguf is not None:
        (output / "adapter.gguf").write_bytes(b"GGUF")
    return name


def test_a_local_job_that_finished_unwatched_is_registered_and_answers_by_default(
    workspace: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF")
    with Store(workspace / "state.db") as store:
        served = finished_unwatched_job(store, workspace, "ftjob-local-1", base)
        over_a_folder = finished_unwatched_job(store, workspace, "ftjob-local-2", None)  # newer, not servable
    settings = load_settings(workspace=workspace)
    assert registered_model(settings) is None  # reading registers nothing
    assert rows(workspace, "SELECT COUNT(*) FROM finetuned_models") == [(0,)]
    assert settle_jobs(settings) == [
        f"Job ftjob-local-1 succeeded while nobody watched: registered {served}",
        f"Job ftjob-local-2 succeeded while nobody watched: registered {over_a_folder}",
    ]
    assert registered_model(settings) == served
    code, out, err = ftkit(workspace, "models", "--json")
    assert code == 0 and err == ""  # registered already, by settle_jobs
    assert [(m["name"], m["metrics"]["train_loss"]) for m in json.loads(out)] == [
        (over_a_folder, 1.5),
        (served, 1.5),
    ]
    assert rows(workspace, "SELECT status FROM jobs ORDER BY id") == [("succeeded",), ("succeeded",)]
    assert (workspace / "training" / "ftjob-local-1-loss.png").is_file()


def test_ask_without_a_fine_tuned_model_says_how_to_make_one(tmp_path: Path) -> None:
    code, _, err = ftkit(tmp_path / "ws", "ask", "How do I export?")
    assert code == 1
    assert err.startswith(
        f"Error: no fine-tuned model in {tmp_path / 'ws'} yet — `ftkit train --watch` makes one"
    )


def test_ask_for_a_model_the_server_does_not_have_fails_before_starting_it(tmp_path: Path) -> None:
    code, _, err = ftkit(tmp_path / "ws", "ask", "How do I export?", "--model", "ft:nope")
    assert code == 1
    assert err.startswith("Error: model ft:nope is not served by the embedded server of")
    assert not (tmp_path / "ws" / "llama-server.json").exists()


def test_the_gguf_adapter_has_llama_cpp_names_shapes_alpha_and_rotary_order(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from finetune_kit.training.gguf_lora import write_gguf_adapter

    config = {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    rank, hidden = 2, 8
    q_b = torch.arange(hidden * rank, dtype=torch.float32).reshape(hidden, rank)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(rank, hidden),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": q_b,
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(rank, 16),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.ones(hidden, rank),
    }
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"lora_alpha": 4, "r": rank}))
    out = write_gguf_adapter(adapter, config, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    found = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(found) == [
        "blk.0.attn_q.weight.lora_a",
        "blk.0.attn_q.weight.lora_b",
        "blk.0.ffn_down.weight.lora_a",
        "blk.0.ffn_down.weight.lora_b",
    ]
    assert found["blk.0.ffn_down.weight.lora_a"].data.shape == (rank, 16)
    # each head's rows are split in halves and interleaved: head 0 rows [0,1,2,3] -> [0,2,1,3]
    order = [int(row[0]) // rank for row in found["blk.0.attn_q.weight.lora_b"].data]
    assert order == [0, 2, 1, 3, 4, 6, 5, 7]
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 4.0
    assert bytes(reader.fields["adapter.type"].parts[-1]).decode() == "lora"


# ---- slow: real training, real serving ------------------------------------------------------------------


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled GGUF materialised once as a Hugging Face checkpoint (about 30 s), shared by the slow tests."""
    from finetune_kit.training.base_model import materialise, resolve_base_model

    return materialise(resolve_base_model(LOCAL_MODEL_ALIAS), tmp_path_factory.mktemp("base-models"))


def seed_base_cache(workspace: Path, checkpoint: Path) -> None:
    cache = workspace / "training" / "base-models"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / checkpoint.name).symlink_to(checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("rotary_order", [True, False])
def test_llama_cpp_serves_the_adapter_as_transformers_peft_computes_it(
    base_checkpoint: Path, tmp_path: Path, rotary_order: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random (non-zero) LoRA moves the logits by ~25; llama.cpp with the GGUF adapter must stay as close to
    transformers + PEFT as the quantised base alone is (~2.6). Without the q/k row reorder it must not."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_kit.llm.local_server import bundled_model_path, llama_options
    from finetune_kit.training import gguf_lora

    if not rotary_order:
        monkeypatch.setattr(gguf_lora, "_unrotate", lambda module, b, config: b)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=LORA_TARGETS)  # as trained
    peft_model = get_peft_model(model, lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((base_checkpoint / "config.json").read_text())
    adapter = gguf_lora.write_gguf_adapter(tmp_path / "adapter", config, tmp_path / "adapter.gguf")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I rotate an SDK key?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = peft_model(ids).logits[0].numpy()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits[0].numpy()

    def llama_logits(**kwargs: str) -> np.ndarray:
        llama = Llama(
            str(bundled_model_path()), n_ctx=512, logits_all=True, verbose=False, **llama_options(), **kwargs
        )
        llama.eval(ids[0].tolist())
        return np.array(llama.scores[: ids.shape[1]])

    base_gap = np.abs(llama_logits() - base).max()
    served = llama_logits(lora_path=str(adapter))
    gap, effect = np.abs(served - tuned).max(), np.abs(tuned - base).max()
    agree = (served.argmax(-1) == tuned.argmax(-1)).mean()
    assert effect > 5 * base_gap  # the adapter changes the model a lot more than quantisation does
    if rotary_order:
        assert gap <= 1.5 * base_gap and agree >= 0.9, (gap, base_gap, agree)
    else:
        assert gap > 2 * base_gap and agree < 0.9, (gap, base_gap, agree)


@pytest.mark.slow
def test_local_training_end_to_end_registers_a_model_that_answers(
    workspace: Path, base_checkpoint: Path
) -> None:
    seed_base_cache(workspace, base_checkpoint)
    code, out, err = ftkit(
        workspace, "train", "--watch", "--backend", "local", "--epochs", "2", "--suffix", "quill"
    )
    assert (code, err) == (0, ""), out
    [(job_id, model)] = rows(workspace, "SELECT id, fine_tuned_model FROM jobs")
    assert model == f"ft:{LOCAL_MODEL_ALIAS}:local:quill:{job_id.rsplit('-', 1)[1]}"
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert steps[0].startswith("step 1/2  train loss ") and steps[0].endswith(" tokens/s")
    assert any(" valid loss " in line for line in steps)
    assert f"Fine-tuned model: {model} (registered; `ftkit models` lists it)" in out
    assert rows(workspace, "SELECT name, backend FROM finetuned_models") == [(model, "local")]
    assert (workspace / "training" / job_id / "adapter" / "adapter_model.safetensors").is_file()
    assert (workspace / "training" / f"{job_id}-loss.png").is_file()

    code, out, err = ftkit(workspace, "ask", "How do I export a document?", "--max-tokens", "24")
    assert (code, err) == (0, f"[{model}]\n")  # which model answered goes to stderr; stdout is the answer
    assert out.strip()
    served = json.loads((workspace / "llama-server-config.json").read_text())["models"]
    assert [m["model_alias"] for m in served] == [LOCAL_MODEL_ALIAS, model]
    assert not (workspace / "llama-server.json").exists()  # the server stopped with the command


@pytest.mark.slow
def test_a_killed_watch_re_attaches_to_the_same_local_job(workspace: Path, base_checkpoint: Path) -> None:
    seed_base_cache(workspace, base_checkpoint)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "finetune_kit", "--workspace", str(workspace), "train", "--watch"]
    watcher = subprocess.Popen([*command, "--backend", "local"], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: stored_steps(workspace) >= 1, timeout_s=240)
    watcher.send_signal(signal.SIGKILL)
    watcher.wait(timeout=10)
    code, out, err = ftkit(workspace, "train", "watch")
    assert (code, err) == (0, ""), out
    assert rows(workspace, "SELECT COUNT(*), MIN(status) FROM jobs") == [(1, "succeeded")]
    assert rows(workspace, "SELECT COUNT(*) FROM local_jobs") == [(1,)]
    assert rows(workspace, "SELECT COUNT(*) FROM training_files") == [(2,)]
    assert rows(workspace, "SELECT COUNT(*) FROM finetuned_models") == [(1,)]


@pytest.mark.slow
def test_cancel_during_training_stops_at_the_end_of_a_step(workspace: Path, base_checkpoint: Path) -> None:
    seed_base_cache(workspace, base_checkpoint)
    assert ftkit(workspace, "train", "--backend", "local", "--epochs", "50")[0] == 0
    [(job_id, pid)] = rows(workspace, "SELECT id, pid FROM local_jobs")
    wait_for(
        lambda: (
            rows(workspace, "SELECT COUNT(*) FROM local_job_events WHERE message LIKE 'Step %'")[0][0] >= 1
        ),
        240,
    )
    code, out, _ = ftkit(workspace, "train", "cancel")
    assert (code, out) == (0, f"Asked to cancel job {job_id}: now cancelled.\n")
    assert not pid_alive(pid)
    [(message,)] = rows(workspace, "SELECT message FROM local_job_events WHERE message LIKE '%cancelled%'")
    assert message.startswith("Fine-tuning job cancelled after step ") and message.endswith(" of 50")
