"""How faithfully llama.cpp serves a LoRA adapter: its logits and greedy answers against transformers + PEFT.

Usage: python bench/serving_faithfulness.py [--prompts 4] [--tokens 24] [--cache DIR]
A random, non-zero LoRA (rank 8 on every module ftkit trains) over the bundled SmolLM2-135M-Instruct is written
as a GGUF adapter the way the local backend writes it, then each prompt goes through both engines. Prints, per
prompt, the largest logit gap of the base model alone (llama.cpp's Q4_1 weights against transformers' fp32:
the quantisation floor), the gap with the adapter, how far the adapter moves the logits, the share of positions
whose top token agrees, and whether the greedy continuations are the same.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_kit.config import LOCAL_MODEL_ALIAS  # noqa: E402
from finetune_kit.training.base_model import materialise, resolve_base_model  # noqa: E402
from finetune_kit.training.local_trainer import LORA_TARGETS  # noqa: E402

PROMPTS = [
    "How do I rotate an SDK key?",
    "What does the --dry-run flag do?",
    "How can I roll back a feature flag change?",
    "Which Python versions are supported?",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens generated per prompt")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ftkit-bench-base-models")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_kit.llm.local_server import bundled_model_path, llama_options
    from finetune_kit.training.gguf_lora import write_gguf_adapter

    checkpoint = materialise(resolve_base_model(LOCAL_MODEL_ALIAS), args.cache)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(model, lora).eval()
    with tempfile.TemporaryDirectory() as out:
        peft_model.save_pretrained(Path(out) / "adapter")
        config = json.loads((checkpoint / "config.json").read_text())
        adapter = write_gguf_adapter(Path(out) / "adapter", config, Path(out) / "adapter.gguf")
        base_llama = Llama(
            str(bundled_model_path()), n_ctx=512, logits_all=True, verbose=False, **llama_options()
        )
        tuned_llama = Llama(
            str(bundled_model_path()),
            n_ctx=512,
            logits_all=True,
            verbose=False,
            lora_path=str(adapter),
            **llama_options(),
        )
        same = base_same = 0
        for prompt in PROMPTS[: args.prompts]:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            row = compare(peft_model, base_llama, tuned_llama, ids, args.tokens, np, torch)
            same += row["greedy_same"]
            print(
                f"{prompt!r}: base gap {row['base_gap']:.2f}, adapter gap {row['gap']:.2f}, adapter effect"
                f" {row['effect']:.1f}, top-token agreement {row['agree']:.0%}, greedy {args.tokens} tokens"
                f" {'identical' if row['greedy_same'] else 'differ'}"
                f" (base alone: {'identical' if row['base_greedy_same'] else 'differ'})"
            )
            base_same += row["base_greedy_same"]
        print(
            f"greedy continuations identical: with the adapter {same}/{args.prompts},"
            f" base alone {base_same}/{args.prompts}"
        )


def compare(
    peft_model: Any, base_llama: Any, tuned_llama: Any, ids: Any, tokens: int, np: Any, torch: Any
) -> dict:
    """Logit gaps on the prompt, then greedy continuations of both engines."""

    def llama_logits(llama: Any) -> Any:
        llama.reset()
        llama.eval(ids[0].tolist())
        return np.array(llama.scores[: ids.shape[1]])

    with torch.no_grad():
        tuned = peft_model(ids).logits[0].numpy()
        with peft_model.disable_adapter():
            base = peft_model(ids).logits[0].numpy()
        hf_greedy = greedy_hf(peft_model, ids, tokens)
        with peft_model.disable_adapter():
            hf_base_greedy = greedy_hf(peft_model, ids, tokens)
    served = llama_logits(tuned_llama)
    return {
        "base_gap": float(np.abs(llama_logits(base_llama) - base).max()),
        "gap": float(np.abs(served - tuned).max()),
        "effect": float(np.abs(tuned - base).max()),
        "agree": float((served.argmax(-1) == tuned.argmax(-1)).mean()),
        "greedy_same": hf_greedy == greedy_llama(tuned_llama, ids, tokens),
        "base_greedy_same": hf_base_greedy == greedy_llama(base_llama, ids, tokens),
    }


def greedy_hf(model: Any, ids: Any, tokens: int) -> list[int]:
    """`tokens` greedy tokens from transformers (EOS and all: llama.cpp is not stopped either)."""
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def greedy_llama(llama: Any, ids: Any, tokens: int) -> list[int]:
    """`tokens` greedy tokens from llama.cpp."""
    llama.reset()
    out: list[int] = []
    for token in llama.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == tokens:
            break
    return out


if __name__ == "__main__":
    main()
