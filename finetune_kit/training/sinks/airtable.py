"""The Airtable models table: one row per fine-tuned model, upserted on its name so re-runs never duplicate."""

import json

from finetune_kit.airtable_api import WRITE_SCOPE, airtable_errors, open_table, parse_table
from finetune_kit.config import Settings
from finetune_kit.training.registry import RegisteredModel

KEY_COLUMN = "Name"
COLUMNS = (KEY_COLUMN, "Base model", "Job", "Dataset", "Created", "Metrics")


def model_fields(model: RegisteredModel) -> dict[str, str]:
    """The row ftkit writes for a model: the recipe's `finetuned_models` columns."""
    values = (
        model.name,
        model.base_model,
        model.job_id,
        model.dataset_hash,
        model.created_at,
        json.dumps(model.metrics, sort_keys=True),
    )
    return dict(zip(COLUMNS, values, strict=True))


def upsert_model(settings: Settings, models_table: str, model: RegisteredModel) -> str:
    """Create or update the model's row in `models_table` (BASE_ID/TABLE); says which it did."""
    table_ref = parse_table(models_table, "airtable_models_table")
    label = f"Airtable models table {table_ref}"
    table = open_table(settings, table_ref, label, WRITE_SCOPE)
    fixes = {column: f'add a "{column}" column to the table ({", ".join(COLUMNS)})' for column in COLUMNS}
    with airtable_errors(settings, label, WRITE_SCOPE, fixes):
        # typecast lets Airtable read "Created" into a date column and the text into any text column
        result = table.batch_upsert([{"fields": model_fields(model)}], key_fields=[KEY_COLUMN], typecast=True)
    verb = "created" if result["createdRecords"] else "updated"
    return f"Airtable: {verb} model {model.name} in {table_ref}"
