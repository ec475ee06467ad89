"""The `finetuned_models` registry: every model training produced, newest first."""

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from finetune_kit.store import Store


@dataclass(frozen=True)
class RegisteredModel:
    """A fine-tuned model that answers under `name`."""

    name: str
    backend: str
    base_model: str
    job_id: str
    dataset_hash: str
    created_at: str
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "RegisteredModel":
        """The model of one `finetuned_models` row."""
        values = {name: value for name, value in dict(row).items() if name in cls.__dataclass_fields__}
        values.pop("metrics", None)
        return cls(**values, metrics=json.loads(row["metrics_json"]))


def register_model(store: Store, model: RegisteredModel) -> None:
    """Record (or update) a model; re-watching a finished job registers it once."""
    store.db.execute(
        """INSERT INTO finetuned_models(name, backend, base_model, job_id, dataset_hash, created_at, metrics_json)
           VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(name) DO UPDATE SET metrics_json = excluded.metrics_json,
               -- new metrics make the sinks' copy stale: publish_pending writes it again
               airtable_table = CASE WHEN metrics_json = excluded.metrics_json THEN airtable_table END""",
        (
            model.name,
            model.backend,
            model.base_model,
            model.job_id,
            model.dataset_hash,
            model.created_at,
            json.dumps(model.metrics, sort_keys=True),
        ),
    )


def list_models(store: Store) -> list[RegisteredModel]:
    """Every registered model, newest first."""
    rows = store.db.execute("SELECT * FROM finetuned_models ORDER BY created_at DESC, rowid DESC").fetchall()
    return [RegisteredModel.from_row(row) for row in rows]
