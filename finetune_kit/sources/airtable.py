"""Read an Airtable table (`airtable:BASE_ID/TABLE`) through pyairtable: one document per record.

The HTTP client here is shared with the models-table sink: Airtable's 5 requests/s per base, a fixed
back-off (30 s) after a 429, a timeout, and every failure turned into one line that names the fix.
"""

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import requests
from pyairtable import Api, Table
from pyairtable.api.types import RecordDict
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from finetune_kit.config import Settings
from finetune_kit.errors import SourceError
from finetune_kit.sources import SkippedFile, SourceDocument, SourceItem

log = logging.getLogger(__name__)

SPEC_PREFIX = "airtable:"
READ_SCOPE = "data.records:read"
WRITE_SCOPE = "data.records:write"
SCHEMA_SCOPE = "schema.bases:read"  # only to link records by table ID when the table is given by name
PAGE_SIZE = 100  # the most Airtable returns per page
RETRIED_STATUSES = (429, 502, 503, 504)
TOKENS_PAGE = "https://airtable.com/create/tokens"
_TABLE = re.compile(r"(?P<base>app[A-Za-z0-9]+)/(?P<table>[^/].*?)/*")
_QUOTED = re.compile(r'"([^"]+)"')


class AirtableError(SourceError):
    """Airtable refused a request, or an Airtable setting is wrong."""


@dataclass(frozen=True)
class AirtableTable:
    """A table in a base, named by ID or name."""

    base_id: str
    table: str

    def __str__(self) -> str:
        return f"{self.base_id}/{self.table}"

    def record_url(self, record_id: str) -> str:
        """The record's page on airtable.com (it opens when the table is given by its tbl… ID)."""
        return f"https://airtable.com/{self.base_id}/{quote(self.table, safe='')}/{record_id}"


def is_airtable_spec(spec: str) -> bool:
    """Say whether a corpus argument names an Airtable table."""
    return spec.startswith(SPEC_PREFIX)


def parse_table(value: str, label: str) -> AirtableTable:
    """Split `BASE_ID/TABLE`; `label` names what held the value, for the error."""
    match = _TABLE.fullmatch(value.strip())
    if match is None:
        raise AirtableError(
            f"{label}: expected BASE_ID/TABLE, e.g. appXXXXXXXXXXXXXX/Docs — copy the base ID (app…) and the"
            " table name or ID (tbl…) from the table's URL"
        )
    return AirtableTable(match["base"], match["table"])


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


def _with_table_id(table: Table, table_ref: AirtableTable, settings: Settings, label: str) -> AirtableTable:
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


def record_item(record: RecordDict, table: AirtableTable, settings: Settings) -> SourceItem:
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


# --- the HTTP client, shared with the models-table sink ---------------------------------------------------


class _FixedBackoffRetry(Retry):
    """urllib3's Retry (what pyairtable's retry_strategy is), waiting `backoff_max` seconds before every retry.

    pyairtable's default retries a 429 after 0, 0.2, 0.4… s; Airtable asks clients to wait 30 s.
    A Retry-After header, when the server sends one, still wins.
    """

    def get_backoff_time(self) -> float:
        return float(self.backoff_max)


class _PacedAdapter(HTTPAdapter):
    """Spaces requests at least 1/per_second apart: Airtable allows 5 requests a second per base."""

    def __init__(self, per_second: float, retry: Retry) -> None:
        super().__init__(max_retries=retry)
        self._interval = 1.0 / per_second
        self._next_at = 0.0
        self._lock = threading.Lock()

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_at)
            self._next_at = start + self._interval
        time.sleep(start - now)
        return super().send(request, *args, **kwargs)


def open_table(settings: Settings, table: AirtableTable, label: str, scope: str) -> Table:
    """A pyairtable Table on a paced, retrying session; needs AIRTABLE_API_KEY."""
    key = settings.airtable_api_key
    if key is None:
        raise AirtableError(
            f"{label}: AIRTABLE_API_KEY is not set — create a personal access token with the {scope} scope"
            f" at {TOKENS_PAGE} and export it as AIRTABLE_API_KEY"
        )
    retry = _FixedBackoffRetry(
        total=settings.airtable.max_retries,
        connect=0,  # a wrong airtable_api_url fails now, not after minutes of back-off
        read=False,  # a timeout is reported as one, not retried
        status_forcelist=RETRIED_STATUSES,
        allowed_methods=None,  # reads, and upserts (idempotent: keyed on fields)
        backoff_max=settings.airtable.backoff_s,
        raise_on_status=False,  # the last 429 reaches airtable_errors, which explains it
    )
    timeout = settings.airtable.timeout_s
    # requests takes float seconds; pyairtable's hint says int
    api = Api(
        key.get_secret_value(),
        timeout=cast(Any, (timeout, timeout)),
        retry_strategy=None,
        endpoint_url=settings.airtable.api_url,
    )
    adapter = _PacedAdapter(settings.airtable.requests_per_second, retry)
    api.session.mount("https://", adapter)
    api.session.mount("http://", adapter)
    return api.table(table.base_id, table.table)


@contextmanager
def airtable_errors(
    settings: Settings, label: str, scope: str, field_fixes: Mapping[str, str]
) -> Iterator[None]:
    """Turn what requests and Airtable raise into one AirtableError line: `label: what — fix`."""
    try:
        yield
    except requests.HTTPError as exc:
        detail = _http_failure(exc.response, settings, scope, field_fixes)
        raise AirtableError(f"{label}: {detail}") from None
    except requests.Timeout:
        raise AirtableError(
            f"{label}: Airtable did not answer within {settings.airtable.timeout_s:g} s"
            " — re-run later, or raise airtable_timeout_s"
        ) from None
    except requests.RequestException:
        raise AirtableError(
            f"{label}: cannot reach Airtable at {settings.airtable.api_url}"
            " — check airtable_api_url and your network"
        ) from None


def _http_failure(
    response: requests.Response | None, settings: Settings, scope: str, field_fixes: Mapping[str, str]
) -> str:
    """What an error status means and how to fix it."""
    status = response.status_code if response is not None else 0
    kind, message = error_of(response)
    if status == 401:
        return f"Airtable rejected AIRTABLE_API_KEY (401 {kind}) — export a valid personal access token from {TOKENS_PAGE}"
    if status == 403:
        return (
            f"no access (403 {kind}) — check the base ID and table, and that the token has the {scope} scope"
            " and access to this base"
        )
    if status == 404:
        return (
            f"not found (404 {kind}) — check the base ID, the table name or ID (tbl…), and airtable_api_url"
        )
    if status == 429:
        return (
            f"Airtable still rate-limits after {settings.airtable.max_retries} retries — wait a minute and"
            " re-run, or lower airtable_requests_per_second"
        )
    if kind == "UNKNOWN_FIELD_NAME":
        name = next(iter(_QUOTED.findall(message)), "?")
        return f'the table has no field "{name}" — {field_fixes.get(name, "check the field names")}'
    if kind == "VIEW_NAME_NOT_FOUND":
        return f"the table has no view '{settings.airtable.view}' — fix airtable_view (--airtable-view)"
    if kind == "INVALID_FILTER_BY_FORMULA":
        return f"Airtable rejected airtable_formula ({message}) — fix the formula (--airtable-formula)"
    if status >= 500:
        return f"Airtable failed ({status} {kind}) — re-run later"
    return f"Airtable refused the request ({status} {kind}: {message}) — check the airtable_* settings"


def error_of(response: requests.Response | None) -> tuple[str, str]:
    """(type, message) of an Airtable error body; its three shapes: object, string, or list of errors."""
    try:
        body = response.json() if response is not None else {}
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        error = body["errors"][0]
        if isinstance(error, dict):
            return str(error.get("error", "ERROR")), str(error.get("message", ""))
    if isinstance(error, dict):
        return str(error.get("type", "ERROR")), str(error.get("message", ""))
    return (str(error) if error else "ERROR"), ""
