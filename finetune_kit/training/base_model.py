"""The open model local training starts from: a Hugging Face checkpoint, materialised once from a GGUF if needed."""

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.config import LOCAL_MODEL_ALIAS
from finetune_kit.errors import TrainingError
from finetune_kit.extras import require_train


@dataclass(frozen=True)
class BaseModel:
    """Where a base model lives: the checkpoint training loads, and the GGUF llama.cpp serves an adapter over."""

    name: str  # what the user asked for: the alias, a GGUF file or a checkpoint folder
    gguf: Path | None  # None for a Hugging Face folder: its adapter cannot be served by llama.cpp
    hf_dir: Path | None  # None until materialised (GGUF) — a Hugging Face folder is used where it is

    @property
    def short_name(self) -> str:
        """A name fit for a model id: `smollm2-135m-instruct`, or the file or folder name."""
        if self.name == LOCAL_MODEL_ALIAS:
            return LOCAL_MODEL_ALIAS
        stem = Path(self.name).name.removesuffix(".gguf")
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-").lower() or "model"


def resolve_base_model(name: str) -> BaseModel:
    """The bundled model (its alias), a GGUF file, or a Hugging Face checkpoint folder; anything else is an error."""
    if name == LOCAL_MODEL_ALIAS:
        from finetune_kit.llm.local_server import bundled_model_path

        return BaseModel(name, bundled_model_path(), None)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        _check_servable(path)
        return BaseModel(name, path.resolve(), None)
    if path.is_dir() and (path / "config.json").is_file():
        return BaseModel(name, None, path.resolve())
    raise TrainingError(
        f"--base-model {name}: not a GGUF file nor a Hugging Face checkpoint folder (with config.json) — the local"
        f" backend trains {LOCAL_MODEL_ALIAS} (the default), a .gguf file or a downloaded checkpoint folder;"
        " it never downloads from a hub"
    )


def _check_servable(gguf_path: Path) -> None:
    """Refuse before training what llama.cpp could not serve the adapter of: not a GGUF, or not a llama model."""
    from llama_cpp import Llama

    from finetune_kit.training.gguf_lora import ARCHITECTURES

    try:  # the vocabulary only: a second, where gguf's reader parses every tensor
        arch = Llama(str(gguf_path), vocab_only=True, verbose=False).metadata.get("general.architecture", "")
    except (ValueError, OSError) as exc:
        raise TrainingError(f"--base-model {gguf_path}: not a readable GGUF model ({exc})") from exc
    if arch not in ARCHITECTURES:
        raise TrainingError(
            f"--base-model {gguf_path}: a {arch!r} model — the local backend trains and serves"
            f" {', '.join(sorted(ARCHITECTURES))}-family GGUF models (SmolLM2, Llama 3, TinyLlama…)"
        )


def materialise(base: BaseModel, cache_dir: Path) -> Path:
    """The base model as a Hugging Face checkpoint folder, converted from its GGUF once and cached."""
    if base.hf_dir is not None:
        return base.hf_dir
    assert base.gguf is not None
    from finetune_kit.llm.local_server import model_fingerprint

    target = cache_dir / f"{base.short_name}-{model_fingerprint(base.gguf).rsplit(':', 1)[1]}"
    if (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model, tokenizer = _load_gguf(base.gguf)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    except BaseException:  # a cancel (SIGTERM) or a crash: leave no half-written 0.5 GB behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():  # another trainer finished first
        shutil.rmtree(partial, ignore_errors=True)
    else:
        os.replace(partial, target)
    return target


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """transformers dequantises a GGUF to float32; its quantisation marks must go before it can be saved."""
    require_train("converting a GGUF base model for training")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise TrainingError(
            f"{gguf}: transformers cannot read this GGUF ({exc}) — use a llama-family GGUF or a checkpoint folder"
        ) from exc
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
