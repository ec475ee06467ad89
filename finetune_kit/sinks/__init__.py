"""Sinks: where a newly fine-tuned model is announced besides the local registry (an Airtable table)."""

import logging

from finetune_kit.config import Settings
from finetune_kit.errors import FtkitError
from finetune_kit.training.registry import RegisteredModel

logger = logging.getLogger(__name__)


def publish_model(settings: Settings, model: RegisteredModel) -> list[str]:
    """Record a registered model in every configured sink; one line each, failures included, never raised."""
    models_table = settings.airtable_models_table
    if models_table is None:
        return []
    from finetune_kit.sinks.airtable import upsert_model  # pyairtable loads only when a sink is set

    try:
        return [upsert_model(settings, models_table, model)]
    except FtkitError as exc:
        # the model is safe in the registry; `ftkit models` lists it, and the next success re-publishes
        logger.warning("Airtable sink failed: %s", exc)
        return [f"Airtable: model {model.name} not recorded: {exc}"]
