"""The optional parts of ftkit (pip extras): whether one is installed, and the one-line error when it is not."""

import importlib.util

from finetune_kit.errors import ExtraMissingError

# What `pip install 'finetune_kit[train]'` adds: local LoRA training and the adapter's conversion to GGUF
# (safetensors, which the conversion also reads, is a base dependency: the local embedder reads its weights).
TRAIN_MODULES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "gguf")


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The top-level modules of `modules` that cannot be imported, found without importing any of them."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def is_train_available() -> bool:
    """True when the `train` extra (PyTorch, Transformers, TRL, PEFT…) is installed."""
    return not missing_modules(TRAIN_MODULES)


def require_train(feature: str) -> None:
    """Raise ExtraMissingError naming the install command when `feature` cannot run without the `train` extra."""
    missing = missing_modules(TRAIN_MODULES)
    if missing:
        raise ExtraMissingError(
            f"{feature} needs the train extra ({', '.join(missing)} not installed) — run"
            " `pip install 'finetune_kit[train]'` (in a clone: `pip install -e '.[train]'`)"
        )
