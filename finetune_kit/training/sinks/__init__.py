"""Sinks: where a newly fine-tuned model is announced besides the local registry (an Airtable table)."""

import logging

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.store import Store
from finetune_kit.training.registry import list_models

logger = logging.getLogger(__name__)


def publish_pending(settings: Settings, store: Store) -> list[str]:
    """Record in the sinks every registered model they do not hold (or hold stale), oldest first; a line each,
    failures included, never raised."""
    models_table = settings.airtable.models_table
    if models_table is None:
        return []
    pending = {
        row["name"]
        for row in store.db.execute(
            "SELECT name FROM finetuned_models WHERE airtable_table IS NOT ?", (models_table,)
        )
    }
    if not pending:
        return []
    from finetune_kit.training.sinks.airtable import (
        upsert_model,  # pyairtable loads only when there is work for it
    )

    lines = []
    for model in reversed(list_models(store)):
        if model.name not in pending:
            continue
        try:
            lines.append(upsert_model(settings, models_table, model))
        except (
            FtkitError
        ) as exc:  # the model is safe in the registry; the next watch or `ftkit models` retries
            logger.warning("Airtable sink failed: %s", exc)
            return [*lines, f"Airtable: model {model.name} not recorded: {exc}"]  # the rest would fail alike
        store.db.execute(
            "UPDATE finetuned_models SET airtable_table = ? WHERE name = ?", (models_table, model.name)
        )
    return lines
