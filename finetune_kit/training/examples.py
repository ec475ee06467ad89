"""The local backend reads the dataset as TRL prompt/completion pairs, so only the answer is learned."""

import json
from pathlib import Path
from typing import Any

from finetune_kit.errors import TrainingError

REBUILD = "rebuild it with `ftkit build-dataset`, or fix that line"


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The dataset's rows as TRL's prompt/completion pairs, so only the answer is learned."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingError(f"{path}:{number}: not JSON ({exc.msg}) — {REBUILD}") from exc
            rows.append(_prompt_completion(record, f"{path}:{number}"))
    if not rows:
        raise TrainingError(f"{path}: no training examples — {REBUILD}")
    return rows


def _prompt_completion(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TrainingError(f"{where}: expected a JSON object — {REBUILD}")
    messages = record.get("messages")
    if (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        and messages[-1].get("role") == "assistant"
    ):
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return {"prompt": record["prompt"], "completion": record["completion"]}
    raise TrainingError(
        f"{where}: expected chat `messages` ending with an assistant turn, or `prompt` and `completion` — {REBUILD}"
    )
