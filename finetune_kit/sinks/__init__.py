"""Sinks: where a newly fine-tuned model is announced besides the local registry (an Airtable table)."""

import logging

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.store import Store
from finetune_kit.training.registry import RegisteredModel, list_models

logger = logging.getLogger(__name__)


def publish_model(settings: Settings, model: RegisteredModel) -> list[str]:
    """Record a registered model in every configured sink; one line each, failures included, never raised."""
    if settings.airtable_models_table is None:
        return []
    try:
        return [_write_airtable(settings, settings.airtable_models_table, model)]
    except FtkitError as exc:
        return [_failed(model, exc)]


def publish_pending(settings: Settings, store: Store) -> list[str]:
    """Record in the sinks every registered model they do not hold yet, oldest first; one line each."""
    models_table = settings.airtable_models_table
    if models_table is None:
        return []
    pending = {
        row["name"]
        for row in store.db.execute(
            "SELECT name FROM finetuned_models WHERE airtable_table IS NOT ?", (models_table,)
        )
    }
    lines = []
    for model in reversed(list_models(store)):
        if model.name not in pending:
            continue
        try:
            lines.append(_write_airtable(settings, models_table, model))
        except FtkitError as exc:
            return [*lines, _failed(model, exc)]  # the rest would fail the same way: retried next time
        store.db.execute(
            "UPDATE finetuned_models SET airtable_table = ? WHERE name = ?", (models_table, model.name)
        )
    return lines


def _write_airtable(settings: Settings, models_table: str, model: RegisteredModel) -> str:
    from finetune_kit.sinks.airtable import upsert_model  # pyairtable loads only when a sink is set

    return upsert_model(settings, models_table, model)


def _failed(model: RegisteredModel, exc: FtkitError) -> str:
    # the model is safe in the registry, and publish_pending writes it on the next watch or `ftkit models`
    logger.warning("Airtable sink failed: %s", exc)
    return f"Airtable: model {model.name} not recorded: {exc}"
