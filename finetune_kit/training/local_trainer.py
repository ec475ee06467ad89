"""The detached trainer of a local job: LoRA on the base model with TRL's SFTTrainer, status and events to SQLite.

Run as `python -m finetune_kit.training.local_trainer STATE_DB JOB_ID` by the local backend. On CPU it turns
off what makes TRL's defaults ~20x slower there than a plain PyTorch loop: bf16 autocast (emulated on CPUs
without AMX/AVX512-BF16), gradient checkpointing (recomputes every layer to save memory a 135M model does not
need) and the fused, chunked LM head (re-projects every position over the 49k vocabulary for entropy and
accuracy metrics). bench/local_train.py measures the result against a plain loop.
"""

import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from finetune_kit.config import setting_default
from finetune_kit.disk_space import disk_full_error, is_disk_full
from finetune_kit.errors import DiskFullError
from finetune_kit.procs import process_start_time
from finetune_kit.store import Store
from finetune_kit.training.backend import TrainingParams
from finetune_kit.training.examples import read_examples
from finetune_kit.training.local_backend import add_event, finish_job, set_status

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_BATCH_SIZE = 4
BASE_LEARNING_RATE = 2e-4  # times --learning-rate-multiplier
# for a job whose stored params leave these unset (started before they were settings): the settings' defaults
DEFAULT_EPOCHS = setting_default("epochs")
DEFAULT_LORA_RANK = setting_default("lora_rank")
DEFAULT_LORA_ALPHA = setting_default("lora_alpha")
DEFAULT_MAX_LENGTH = setting_default("training_max_length")


class Cancelled(Exception):
    """The job was cancelled while the trainer was not yet training."""


class Journal:
    """Where the trainer reports: the job's row and events — or nowhere, in the extra processes of a multi-GPU
    launch (`accelerate launch` starts one per GPU; only the first, RANK 0, speaks for the job)."""

    def __init__(self, store: Store, job_id: str, enabled: bool = True) -> None:
        self.store, self.job_id, self.enabled = store, job_id, enabled

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Append an event to the job's log."""
        if self.enabled:
            add_event(self.store, self.job_id, message, level, data)

    def status(self, status: str, **fields: Any) -> None:
        """Move the job to `status`."""
        if self.enabled:
            set_status(self.store, self.job_id, status, **fields)

    def finish(self, status: str, **fields: Any) -> None:
        """End the job (once)."""
        if self.enabled:
            finish_job(self.store, self.job_id, status, **fields)

    def started(self, pid: int) -> None:
        """Record this process as the job's trainer, if the process that started it could not (killed first)."""
        if self.enabled:
            self.store.db.execute(
                "UPDATE local_jobs SET pid = ?, pid_started = ? WHERE id = ? AND pid IS NULL",
                (pid, process_start_time(pid), self.job_id),
            )

    def cancel_requested(self) -> bool:
        """True once `ftkit train cancel` asked this job to stop."""
        return bool(self.store.scalar("SELECT cancel_requested FROM local_jobs WHERE id = ?", (self.job_id,)))


def main(db_path: str, job_id: str) -> int:
    """Train job `job_id`; every outcome, a crash included, ends up in its row."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    stop = {"requested": False, "training": False}

    def on_term(*_: object) -> None:
        stop["requested"] = True
        if not stop["training"]:  # loading or converting: stop now; once training, at the end of the step
            raise Cancelled

    signal.signal(signal.SIGTERM, on_term)
    with Store(Path(db_path)) as store:
        journal = Journal(store, job_id, enabled=int(os.environ.get("RANK", "0")) == 0)
        journal.started(os.getpid())
        try:
            train(journal, stop)
        except Cancelled:
            _cancelled(journal)
        except BaseException as exc:
            traceback.print_exc()
            output = store.scalar("SELECT output_dir FROM local_jobs WHERE id = ?", (job_id,))
            reason = failure_reason(exc, Path(output) if output else Path(db_path).parent)
            # events before the final status: a watch that sees the job end has seen every event
            journal.event(f"Training failed: {reason[:500]}", level="error")
            journal.finish("failed", error=reason[:500])
            return 1
    return 0


def failure_reason(exc: BaseException, output: Path) -> str:
    """The job's error in one line; a full disk names the file (or else the job's output folder) and the space free."""
    if isinstance(exc, DiskFullError):
        return str(exc)
    if is_disk_full(exc):
        filename = exc.filename if isinstance(exc, OSError) else None
        return str(disk_full_error(Path(filename) if filename else output))
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


def train(journal: Journal, stop: dict[str, bool]) -> None:
    """Validate the files, load the base model, train, save and convert the adapter, then report success."""
    job_id = journal.job_id
    row = journal.store.db.execute("SELECT * FROM local_jobs WHERE id = ?", (job_id,)).fetchone()
    params = TrainingParams.from_json(row["params_json"])
    options = json.loads(row["options_json"])
    output = Path(row["output_dir"])
    journal.event("Validating training file")
    train_rows = read_examples(Path(row["train_file"]))
    validation_rows = read_examples(Path(row["validation_file"])) if row["validation_file"] else []
    journal.event("Files validated, moving job to queued state")
    journal.status("queued")  # the hosted service's order: validating_files, queued, running
    _check_stop(journal, stop)

    import torch

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    from finetune_kit.training.base_model import materialise, resolve_base_model

    base = resolve_base_model(params.base_model)
    journal.event(f"Loading base model {base.short_name}")
    checkpoint = materialise(base, Path(row["output_dir"]).parent / "base-models")
    _check_stop(journal, stop)
    journal.status("running")
    events = job_events(journal, stop)
    trainer = build_trainer(params, options, checkpoint, train_rows, validation_rows, output, [events])
    journal.event(f"Fine-tuning job started on {_device()}: {len(train_rows)} examples")
    stop["training"] = True
    trainer.train()
    if stop["requested"] or journal.cancel_requested():
        _cancelled(journal, f" after step {trainer.state.global_step} of {trainer.state.max_steps}")
        return
    if journal.enabled:
        _save(journal, trainer, checkpoint, output, base.gguf is not None)
    name = model_name(base.short_name, params.suffix, job_id)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    journal.event(f"New fine-tuned model created: {name}")
    journal.event("The job has successfully completed")
    journal.finish("succeeded", fine_tuned_model=name, trained_tokens=tokens)


def build_trainer(
    params: TrainingParams,
    options: dict[str, Any],
    checkpoint: Path,
    train_rows: list[dict[str, Any]],
    validation_rows: list[dict[str, Any]],
    output: Path,
    callbacks: list[Any],
) -> Any:
    """An SFTTrainer with LoRA, set up for the device it runs on."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16 if bf16 else torch.float32)
    rank = params.lora_rank or DEFAULT_LORA_RANK
    lora = LoraConfig(
        r=rank,
        lora_alpha=params.lora_alpha or DEFAULT_LORA_ALPHA,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(output / "trainer"),
        num_train_epochs=params.n_epochs or DEFAULT_EPOCHS,
        per_device_train_batch_size=params.batch_size or DEFAULT_BATCH_SIZE,
        per_device_eval_batch_size=params.batch_size or DEFAULT_BATCH_SIZE,
        learning_rate=BASE_LEARNING_RATE * (params.learning_rate_multiplier or 1.0),
        seed=params.seed if params.seed is not None else 42,
        max_length=params.max_length or DEFAULT_MAX_LENGTH,
        logging_steps=1,
        eval_strategy="epoch" if validation_rows else "no",
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens, not padding
    )
    trainer_class = _sft_trainer_class(fused_head=cuda)
    return trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(validation_rows) if validation_rows else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


def _sft_trainer_class(fused_head: bool) -> Any:
    """TRL's SFTTrainer; on CPU with the plain loss from the logits instead of its fused LM head."""
    import transformers
    from trl import SFTTrainer

    if fused_head:
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            keep = {"input_ids", "attention_mask", "labels", "position_ids"}
            inputs = {key: value for key, value in inputs.items() if key in keep}
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def job_events(journal: Journal, stop: dict[str, bool]) -> Any:
    """A TrainerCallback that writes each logged step (loss, tokens/s) and eval as job events, and stops
    training when the job is cancelled (transformers is imported here, not when this module loads)."""
    from transformers import TrainerCallback

    class JobEvents(TrainerCallback):  # type: ignore[misc]
        """Writes each logged step (loss, tokens/s) and eval as job events; stops when the job is cancelled."""

        def __init__(self) -> None:
            self.journal, self.stop = journal, stop
            self.started = time.monotonic()
            self.last_time, self.last_tokens = self.started, 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.started = self.last_time = time.monotonic()  # model loading is not training time

        def on_evaluate(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.last_time = time.monotonic()  # validation time is not training time either

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
        ) -> None:
            logs = logs or {}
            step, total = state.global_step, state.max_steps
            if "eval_loss" in logs:
                valid = float(logs["eval_loss"])
                data = {"step": step, "total_steps": total, "valid_loss": valid}
                self.journal.event(f"Step {step}/{total}: validation loss={valid:.4f}", data=data)
            elif "loss" in logs:
                self._step(step, total, float(logs["loss"]), int(state.num_input_tokens_seen or 0))
            if self.stop["requested"] or self.journal.cancel_requested():
                control.should_training_stop = True

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.stop["requested"]:
                control.should_training_stop = True

        def _step(self, step: int, total: int, loss: float, tokens: int) -> None:
            now = time.monotonic()
            rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-6) if tokens else None
            self.last_time, self.last_tokens = now, tokens or self.last_tokens
            data: dict[str, Any] = {"step": step, "total_steps": total, "train_loss": loss, "tokens": tokens}
            message = f"Step {step}/{total}: training loss={loss:.4f}"
            if rate is not None:
                data["tokens_per_s"] = round(rate, 1)
                message += f", {rate:.0f} tokens/s"
            self.journal.event(message, data=data)
            if step and total and not math.isnan(loss):
                per_step = (now - self.started) / step
                self.journal.status("running", estimated_finish=int(time.time() + per_step * (total - step)))

    return JobEvents()


def _save(journal: Journal, trainer: Any, checkpoint: Path, output: Path, servable: bool) -> None:
    """Save the PEFT adapter and, over a GGUF base, its llama.cpp form."""
    from finetune_kit.training.gguf_lora import write_gguf_adapter

    adapter = output / "adapter"
    trainer.model.save_pretrained(adapter)
    journal.event(f"Saved the LoRA adapter to {adapter}")
    if servable:
        config = json.loads((checkpoint / "config.json").read_text())
        write_gguf_adapter(adapter, config, output / "adapter.gguf")
        journal.event("Converted the adapter to GGUF for the embedded llama.cpp server")
    else:
        journal.event(
            f"The base model is not a GGUF file, so the embedded llama.cpp server cannot serve this adapter;"
            f" load {adapter} with PEFT over the base model instead",
            level="warn",
        )


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:local:<suffix>:<job>`, shaped like OpenAI's fine-tuned model names."""
    return f"ft:{base}:local:{suffix or ''}:{job_id.rsplit('-', 1)[-1]}"


def _device() -> str:
    import torch

    return (
        f"GPU ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )


def _check_stop(journal: Journal, stop: dict[str, bool]) -> None:
    if stop["requested"] or journal.cancel_requested():
        raise Cancelled


def _cancelled(journal: Journal, where: str = "") -> None:
    journal.event(f"Fine-tuning job cancelled{where}")
    journal.finish("cancelled")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1], sys.argv[2]))
