"""Write a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp applies over the base GGUF it was trained on.

llama.cpp's own converter (convert_lora_to_gguf.py) is not in the llama-cpp-python wheel, so this does the same
small job with the `gguf` library: map each target module to its GGUF tensor name, write A and B unchanged
(llama.cpp checks `a: [r, in]`, `b: [out, r]`), record alpha, and undo nothing but the one thing the GGUF
converter changes in llama weights — the rotary row order of q and k — on B, the factor that carries the rows.
"""

import json
import re
from pathlib import Path
from typing import Any

from finetune_kit.disk_space import written_whole
from finetune_kit.errors import TrainingError
from finetune_kit.extras import require_train

ARCHITECTURES = {"llama": "LLAMA"}  # what transformers calls it -> gguf.MODEL_ARCH member
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def write_gguf_adapter(adapter_dir: Path, base_config: dict[str, Any], out: Path) -> Path:
    """Convert the adapter saved in `adapter_dir` (adapter_config.json + adapter_model.safetensors) to `out`."""
    require_train("the GGUF conversion of a LoRA adapter")
    import gguf
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    arch = base_config.get("model_type", "")
    if arch not in ARCHITECTURES:
        raise TrainingError(
            f"serving a LoRA adapter through llama.cpp supports {sorted(ARCHITECTURES)} models, not {arch!r}"
        )
    n_layers = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch]), n_layers)
    pairs = _pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    with written_whole(out, ".partial") as partial:  # a full disk or a cancel leaves no half-written adapter
        writer = gguf.GGUFWriter(partial, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        for module, (a, b) in sorted(pairs.items()):
            target = names.get_name(module, try_suffixes=(".weight",))
            if target is None:
                raise TrainingError(
                    f"adapter module {module} has no llama.cpp tensor — train attention/MLP modules only"
                )
            b = _unrotate(module, b, base_config)
            writer.add_tensor(f"{target}.weight.lora_a", a.float().contiguous().numpy())
            writer.add_tensor(f"{target}.weight.lora_b", b.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _pairs(tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{module: (A, B)} from PEFT's `base_model.model.<module>.lora_A.weight` keys."""
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise TrainingError(
                f"adapter tensor {key} is not a LoRA A/B matrix — only plain LoRA can be served"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    incomplete = [module for module, both in parts.items() if set(both) != {"A", "B"}]
    if incomplete:
        raise TrainingError(
            f"adapter module {incomplete[0]} lacks its A or B matrix — the adapter file is damaged"
        )
    return {module: (both["A"], both["B"]) for module, both in parts.items()}


def _unrotate(module: str, b: Any, config: dict[str, Any]) -> Any:
    """The GGUF converter reorders q/k rows for llama.cpp's rotary layout; B's rows must follow."""
    if module.endswith("self_attn.q_proj"):
        return _permute(b, int(config["num_attention_heads"]))
    if module.endswith("self_attn.k_proj"):
        return _permute(b, int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    return b


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's `permute`: split each head's rows into two halves and interleave them."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
