"""Read an Airtable table (`airtable:BASE_ID/TABLE`) through pyairtable: one document per record.

The HTTP client (pacing, back-off, errors that name the fix) is finetune_kit.airtable_api, shared with the
models-table sink.
"""

import logging
from typing import TYPE_CHECKING, Any

from finetune_kit.airtable_api import (
    READ_SCOPE,
    SCHEMA_SCOPE,
    AirtableTable,
    airtable_errors,
    open_table,
    parse_table,
)
from finetune_kit.config import Settings
from finetune_kit.errors import AirtableError
from finetune_kit.sources import ReadContext, SkippedFile, SourceDocument, SourceIdentity, SourceItem

if TYPE_CHECKING:
    from pyairtable import Table
    from pyairtable.api.types import RecordDict

log = logging.getLogger(__name__)

SPEC_PREFIX = "airtable:"
PAGE_SIZE = 100  # the most Airtable returns per page


def parse_spec(spec: str) -> AirtableTable:
    """The table an `airtable:BASE_ID/TABLE` source names."""
    return parse_table(spec.removeprefix(SPEC_PREFIX), spec)


def source_key(spec: str) -> str:
    """What identifies the source across runs, whatever the spelling of the spec."""
    return f"{SPEC_PREFIX}{parse_spec(spec)}"


def read_airtable(spec: str, settings: Settings) -> list[SourceItem]:
    """Every record of the table (or of the view, filtered by the formula) as a document or a skip."""
    table_ref = parse_spec(spec)
    table = open_table(settings, table_ref, spec, READ_SCOPE)
    options: dict[str, Any] = {"page_size": PAGE_SIZE, "fields": _mapped_fields(settings)}
    if settings.airtable.view is not None:
        options["view"] = settings.airtable.view
    if settings.airtable.formula is not None:
        options["formula"] = settings.airtable.formula
    with airtable_errors(settings, spec, READ_SCOPE, _field_settings(settings)):
        records = [record for page in table.iterate(**options) for record in page]
    linked = _with_table_id(table, table_ref, settings, spec) if records else table_ref
    items = [record_item(record, linked, settings) for record in records]
    if not items:
        raise AirtableError(
            f"{spec}: no records{_selection(settings)} — check the table, airtable_view and airtable_formula"
        )
    if not any(isinstance(item, SourceDocument) for item in items):
        raise AirtableError(
            f"{spec}: all {len(items)} records are empty (no text in {', '.join(settings.airtable.body_fields)})"
            " — point airtable_body_fields (--airtable-body-field) at the columns that hold the text"
        )
    return items


def _with_table_id(table: "Table", table_ref: AirtableTable, settings: Settings, label: str) -> AirtableTable:
    """The table named by its tbl… ID, which record links need to open; the name, when the token cannot read
    the base's schema (scope schema.bases:read)."""
    if table_ref.table.startswith("tbl"):
        return table_ref
    try:
        with airtable_errors(settings, label, SCHEMA_SCOPE, {}):
            return AirtableTable(table_ref.base_id, table.id)
    except (AirtableError, KeyError) as exc:  # KeyError: pyairtable found no table of that name in the schema
        log.warning(
            "%s: record links name the table and may not open (%s) — pass the table's ID (tbl…) or give the"
            " token the %s scope",
            label,
            exc,
            SCHEMA_SCOPE,
        )
        return table_ref


def _mapped_fields(settings: Settings) -> list[str]:
    """The fields the mapping reads, so Airtable sends only those and rejects a misspelt one."""
    fields = [settings.airtable.title_field, *settings.airtable.body_fields]
    if settings.airtable.url_field is not None:
        fields.append(settings.airtable.url_field)
    return list(dict.fromkeys(fields))


def _field_settings(settings: Settings) -> dict[str, str]:
    """field name -> how to fix a mapping that names a field the table lacks."""
    fixes = {
        name: "fix airtable_body_fields (--airtable-body-field)" for name in settings.airtable.body_fields
    }
    fixes[settings.airtable.title_field] = "fix airtable_title_field (--airtable-title-field)"
    if settings.airtable.url_field is not None:
        fixes[settings.airtable.url_field] = "fix airtable_url_field (--airtable-url-field)"
    return fixes


def _selection(settings: Settings) -> str:
    view = f" in view '{settings.airtable.view}'" if settings.airtable.view is not None else ""
    formula = f" matching {settings.airtable.formula}" if settings.airtable.formula is not None else ""
    return view + formula


def record_item(record: "RecordDict", table: AirtableTable, settings: Settings) -> SourceItem:
    """One record as Markdown: `# title`, then the body fields (each under `## field` when several)."""
    fields = record.get("fields", {})
    body_fields = settings.airtable.body_fields
    sections = [(name, field_text(fields.get(name))) for name in body_fields]
    sections = [(name, text) for name, text in sections if text]
    if not sections:
        return SkippedFile(record["id"], f"empty record (no text in {', '.join(body_fields)})")
    if len(body_fields) == 1:
        body = sections[0][1]
    else:
        body = "\n\n".join(f"## {name}\n\n{text}" for name, text in sections)
    title = " ".join(field_text(fields.get(settings.airtable.title_field)).split())
    url = field_text(fields.get(settings.airtable.url_field)) if settings.airtable.url_field else ""
    return SourceDocument(
        path=record["id"],
        source_url=url or table.record_url(record["id"]),
        text=(f"# {title}\n\n{body}" if title else body) + "\n",
        format="markdown",
    )


def field_text(value: object) -> str:
    """A cell as text: lists joined; collaborators, attachments, buttons and AI text by their text."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list):
        return ", ".join(text for text in map(field_text, value) if text)
    if isinstance(value, dict):
        for key in ("value", "name", "label", "filename", "email", "url"):
            if isinstance(value.get(key), str) and value[key].strip():
                return str(value[key]).strip()
    return ""


class AirtableSource:
    """`airtable:BASE_ID/TABLE`: one document per record."""

    name = "airtable"

    def claims(self, spec: str) -> bool:
        """Say whether `spec` names an Airtable table."""
        return spec.startswith(SPEC_PREFIX)

    def identity(self, spec: str) -> SourceIdentity:
        """The table, however the spec spells it."""
        return SourceIdentity("airtable", source_key(spec))

    def read(self, spec: str, context: ReadContext) -> list[SourceItem]:
        """Every record as a document or a skip."""
        return read_airtable(spec, context.settings)
