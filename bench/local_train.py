"""Local LoRA training speed: ftkit's trainer (TRL SFTTrainer, CPU settings) against a plain PyTorch LoRA loop.

Usage: python bench/local_train.py [--steps 6] [--batch 4] [--length 256] [--repeats 3] [--trl-defaults]
Both train the same model (the bundled SmolLM2-135M-Instruct, materialised once into --cache), the same LoRA
(rank 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down), on the very same batches: the plain loop takes them from
ftkit's trainer's own data loader (every example cut to exactly --length tokens, so no padding). The first step of
each is warm-up and not timed. Prints tokens/s for each, their ratio, and the median over --repeats runs.
--trl-defaults also times TRL's SFTTrainer with its own defaults (bf16 autocast, gradient checkpointing, fused LM
head); on a 2-core CPU that takes many minutes.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.config import LOCAL_MODEL_ALIAS  # noqa: E402
from finetune_kit.training.backend import TrainingParams  # noqa: E402
from finetune_kit.training.base_model import materialise, resolve_base_model  # noqa: E402
from finetune_kit.training.local_trainer import LORA_TARGETS, build_trainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps (one more is run as warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="tokens per example")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ftkit-bench-base-models")
    parser.add_argument("--trl-defaults", action="store_true")
    return parser.parse_args()


def examples(n: int) -> list[dict[str, Any]]:
    """Chat examples whose answer is a long slice of the sample docs, so each one is cut to --length tokens."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "data" / "sample-docs").rglob("*.md")))
    size = 4000
    return [
        {
            "prompt": [{"role": "user", "content": "Recite the Quillstack docs."}],
            "completion": [{"role": "assistant", "content": (text * 2)[i * 997 : i * 997 + size]}],
        }
        for i in range(n)
    ]


class StepTimer:
    """A TrainerCallback (duck-typed) timing steps after the first, and counting their tokens."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.tokens_at_start = 0
        self.elapsed, self.tokens = 0.0, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.global_step == 1:
            self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen
        elif self.started is not None:
            self.elapsed = time.perf_counter() - self.started
            self.tokens = state.num_input_tokens_seen - self.tokens_at_start

    def __getattr__(self, name: str) -> Any:  # every other callback event: do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def ftkit_trainer(checkpoint: Path, args: argparse.Namespace, out: Path, trl_defaults: bool = False) -> Any:
    params = TrainingParams(
        LOCAL_MODEL_ALIAS, n_epochs=1, batch_size=args.batch, seed=0, max_length=args.length
    )
    rows = examples(args.batch * (args.steps + 1))
    if not trl_defaults:
        return build_trainer(params, {}, checkpoint, rows, [], out, [])
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_length=args.length,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,  # the one change TRL demands on a machine without a GPU
        include_num_input_tokens_seen="non_padding",
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(checkpoint),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(checkpoint),
        peft_config=lora,
    )


def time_trainer(trainer: Any) -> float:
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.tokens / timer.elapsed


def time_plain_loop(checkpoint: Path, batches: list[dict[str, Any]], like: Any) -> float:
    """A textbook LoRA loop: forward with labels, backward, AdamW step, on the device and dtype of `like`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    weight = next(like.parameters())
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=weight.dtype).to(weight.device)
    model = get_peft_model(base, lora).train()
    sync = torch.cuda.synchronize if weight.device.type == "cuda" else lambda: None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    started, tokens = 0.0, 0
    for step, batch in enumerate(batches):
        if step == 1:
            sync()
            started = time.perf_counter()
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 1:
            tokens += int(batch["attention_mask"].sum())
    sync()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    import torch

    checkpoint = materialise(resolve_base_model(LOCAL_MODEL_ALIAS), args.cache)
    ratios, ours, plain = [], [], []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            trainer = ftkit_trainer(checkpoint, args, Path(out))
            batches = list(trainer.get_train_dataloader())
            lengths = {tuple(batch["input_ids"].shape) for batch in batches}
            plain.append(time_plain_loop(checkpoint, batches, trainer.model))
            ours.append(time_trainer(trainer))
            ratios.append(ours[-1] / plain[-1])
            print(
                f"run: ftkit {ours[-1]:.1f} tok/s, plain loop {plain[-1]:.1f} tok/s, ratio {ratios[-1]:.3f}"
            )
        print(
            f"config: batch {args.batch} x {args.length} tokens (batch shapes {sorted(lengths)}),"
            f" {args.steps} timed steps, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(
            f"median: ftkit {statistics.median(ours):.1f} tok/s, plain loop {statistics.median(plain):.1f} tok/s,"
            f" ratio {statistics.median(ratios):.3f}"
        )
        if args.trl_defaults:
            rate = time_trainer(ftkit_trainer(checkpoint, args, Path(out), trl_defaults=True))
            print(f"TRL defaults: {rate:.1f} tok/s, {rate / statistics.median(plain):.3f} of the plain loop")


if __name__ == "__main__":
    main()
