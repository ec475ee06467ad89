"""The Airtable HTTP client, one for the source and the models-table sink.

Airtable's 5 requests/s per base, a fixed back-off (30 s) after a 429, a timeout, and every failure turned into
one line that names the fix. pyairtable loads only when a table is opened.
"""

import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from finetune_kit.config import Settings
from finetune_kit.errors import AirtableError

if TYPE_CHECKING:
    from pyairtable import Table

READ_SCOPE = "data.records:read"
WRITE_SCOPE = "data.records:write"
SCHEMA_SCOPE = "schema.bases:read"  # only to link records by table ID when the table is given by name
RETRIED_STATUSES = (429, 502, 503, 504)
TOKENS_PAGE = "https://airtable.com/create/tokens"
_TABLE = re.compile(r"(?P<base>app[A-Za-z0-9]+)/(?P<table>[^/].*?)/*")
_QUOTED = re.compile(r'"([^"]+)"')


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


def parse_table(value: str, label: str) -> AirtableTable:
    """Split `BASE_ID/TABLE`; `label` names what held the value, for the error."""
    match = _TABLE.fullmatch(value.strip())
    if match is None:
        raise AirtableError(
            f"{label}: expected BASE_ID/TABLE, e.g. appXXXXXXXXXXXXXX/Docs — copy the base ID (app…) and the"
            " table name or ID (tbl…) from the table's URL"
        )
    return AirtableTable(match["base"], match["table"])


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


def open_table(settings: Settings, table: AirtableTable, label: str, scope: str) -> "Table":
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
    from pyairtable import Api  # loads only when a table is opened

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
