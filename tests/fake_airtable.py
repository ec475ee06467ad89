"""A fake Airtable Web API on 127.0.0.1, speaking Airtable's wire format and recording every request.

List records: `GET /v0/{base}/{table}` with pageSize/offset paging, view, filterByFormula (the
`{Field} = 'value'` form) and fields[]; empty cells are left out of a record, as Airtable does.
Upsert: `PATCH /v0/{base}/{table}` with performUpsert.fieldsToMergeOn, creating then updating.
Errors: 401 on a bad token, 403 for an unknown base, 404 for an unknown table, 422 for an unknown
field, view or formula, and 429 (RATE_LIMIT_REACHED) for the next `rate_limited` requests.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback import LoopbackServer

API_KEY = "patFAKE0123456789.0123456789abcdef0123456789abcdef"
BASE = "appFAKEBASE000001"
MAX_PAGE_SIZE = 100
_EQUALS = re.compile(r"""\s*\{(?P<field>[^}]+)\}\s*=\s*(?P<q>['"])(?P<value>.*)(?P=q)\s*""")

Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class AirtableCall:
    """One request as the fake received it."""

    method: str
    base: str
    table: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None
    status: int
    at: float


@dataclass
class FakeTable:
    """A table: its columns, its records ({"id", "createdTime", "fields"}) and its views (record ids)."""

    name: str
    id: str
    columns: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    views: dict[str, list[str]] = field(default_factory=dict)


class FakeAirtable:
    """Airtable's Web API on a free 127.0.0.1 port, for use as a context manager."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.tables: dict[tuple[str, str], FakeTable] = {}
        self.calls: list[AirtableCall] = []
        self.schema_calls: list[AirtableCall] = []  # GET /v0/meta/bases/{base}/tables
        self.rate_limited = 0  # answer this many next requests with 429
        self.delay_s = 0.0  # wait this long before answering
        self.schema_readable = True  # False: the token lacks schema.bases:read (the schema API answers 403)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: LoopbackServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The API endpoint (what airtable_api_url is set to)."""
        assert self._server is not None, "use FakeAirtable as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeAirtable:
        self._server = LoopbackServer(("127.0.0.1", 0), _Handler)
        self._server.fake = self  # type: ignore[attr-defined]
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="fake-airtable", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    # --- what tests set up and read -----------------------------------------------------------------

    def add_table(self, name: str, columns: list[str], base: str = BASE) -> FakeTable:
        """Create an empty table."""
        table = FakeTable(name=name, id=f"tbl{next(self._ids):014d}", columns=list(columns))
        self.tables[(base, name)] = table
        return table

    def add_record(self, table: FakeTable, fields: dict[str, Any]) -> str:
        """Add a record; returns its id."""
        record_id = f"rec{next(self._ids):014d}"
        with self._lock:
            table.records.append({"id": record_id, "createdTime": _now(), "fields": dict(fields)})
        return record_id

    def record(self, table: FakeTable, record_id: str) -> dict[str, Any]:
        """One record as it stands now."""
        return next(r for r in table.records if r["id"] == record_id)

    def calls_to(self, method: str) -> list[AirtableCall]:
        """The requests made with one HTTP method, in order."""
        with self._lock:
            return [call for call in self.calls if call.method == method]

    # --- the API ------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, list[str]], token: str, body: Any) -> Answer:
        """Route one request; record it with the status it got."""
        if self.delay_s:
            time.sleep(self.delay_s)
        parts = [urllib.parse.unquote(part) for part in path.strip("/").split("/")]
        base, table_name = (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "v0" else ("", "")
        is_schema = len(parts) == 5 and parts[:3] == ["v0", "meta", "bases"] and parts[4] == "tables"
        with self._lock:
            if is_schema and token == self.api_key:  # kept apart: `calls` is the records API's log
                status, payload = self._schema(parts[3])
                self.schema_calls.append(
                    AirtableCall(method, parts[3], "", query, body, status, time.monotonic())
                )
                return status, payload
            status, payload = self._route(method, base, table_name, query, token, body)
            self.calls.append(AirtableCall(method, base, table_name, query, body, status, time.monotonic()))
        return status, payload

    def _route(
        self, method: str, base: str, table_name: str, query: dict[str, list[str]], token: str, body: Any
    ) -> Answer:
        if token != self.api_key:
            return _error(401, "AUTHENTICATION_REQUIRED", "Authentication required")
        if self.rate_limited > 0:
            self.rate_limited -= 1
            message = "Rate limit exceeded. Please try again later"
            return 429, {"errors": [{"error": "RATE_LIMIT_REACHED", "message": message}]}
        if not base:
            return 404, {"error": "NOT_FOUND"}
        if not any(key[0] == base for key in self.tables):
            return _error(
                403,
                "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND",
                "Invalid permissions, or the requested model was not found. Check that both your user and"
                " your token have the required permissions, and that the model names and/or ids are correct.",
            )
        table = self._table(base, table_name)
        if table is None:
            return _error(404, "TABLE_NOT_FOUND", f"Could not find table {table_name} in application {base}")
        if method == "GET":
            return self._list_records(table, query)
        if method in ("PATCH", "PUT") and isinstance(body, dict) and "performUpsert" in body:
            return self._upsert(table, body, replace=method == "PUT")
        return _error(422, "INVALID_REQUEST_UNKNOWN", "Invalid request: the fake supports list and upsert")

    def _schema(self, base: str) -> Answer:
        """GET /v0/meta/bases/{base}/tables: every table's id, name, fields and views, as Airtable's schema API."""
        if not self.schema_readable:
            return _error(403, "INVALID_PERMISSIONS_OR_MODEL_NOT_FOUND", "Invalid permissions")
        tables = [
            {
                "id": table.id,
                "name": table.name,
                "primaryFieldId": f"fld{table.id[3:]}0",
                "fields": [
                    {"id": f"fld{table.id[3:]}{n}", "name": column, "type": "multilineText"}
                    for n, column in enumerate(table.columns)
                ],
                "views": [{"id": f"viw{view}", "name": view, "type": "grid"} for view in table.views],
            }
            for (b, _), table in self.tables.items()
            if b == base
        ]
        return 200, {"tables": tables}

    def _table(self, base: str, name_or_id: str) -> FakeTable | None:
        return next(
            (t for (b, _), t in self.tables.items() if b == base and name_or_id in (t.name, t.id)), None
        )

    def _list_records(self, table: FakeTable, query: dict[str, list[str]]) -> Answer:
        records = table.records
        if view := _one(query, "view"):
            if view not in table.views:
                return _error(422, "VIEW_NAME_NOT_FOUND", f'Could not find view "{view}" in table')
            by_id = {r["id"]: r for r in records}
            records = [by_id[rid] for rid in table.views[view] if rid in by_id]
        if formula := _one(query, "filterByFormula"):
            match = _EQUALS.fullmatch(formula)
            if match is None or match["field"] not in table.columns:
                message = "The formula for filtering records is invalid: Invalid formula. Please check your formula text."
                return _error(422, "INVALID_FILTER_BY_FORMULA", message)
            records = [r for r in records if r["fields"].get(match["field"]) == match["value"]]
        wanted = query.get("fields[]")
        for name in wanted or []:
            if name not in table.columns:
                return _error(422, "UNKNOWN_FIELD_NAME", f'Unknown field name: "{name}"')
        size = int(_one(query, "pageSize") or MAX_PAGE_SIZE)
        if not 1 <= size <= MAX_PAGE_SIZE:
            return _error(422, "INVALID_PAGE_SIZE", "The pageSize parameter must be between 1 and 100")
        offset = _one(query, "offset")
        start = int(offset.rpartition("/")[2]) if offset else 0
        page = [_visible(record, wanted) for record in records[start : start + size]]
        payload: dict[str, Any] = {"records": page}
        if start + size < len(records):
            payload["offset"] = f"itrFAKE{id(table) % 10_000:04d}/{start + size}"
        return 200, payload

    def _upsert(self, table: FakeTable, body: dict[str, Any], replace: bool) -> Answer:
        merge_on = body["performUpsert"].get("fieldsToMergeOn") or []
        incoming = body.get("records") or []
        if not 1 <= len(incoming) <= 10:
            return _error(422, "INVALID_RECORDS", "You must provide an array of up to 10 record objects.")
        for name in [*merge_on, *(n for r in incoming for n in r.get("fields", {}))]:
            if name not in table.columns:
                return _error(422, "UNKNOWN_FIELD_NAME", f'Unknown field name: "{name}"')
        created: list[str] = []
        updated: list[str] = []
        result = []
        for item in incoming:
            fields = item.get("fields", {})
            matches = [r for r in table.records if all(r["fields"].get(k) == fields.get(k) for k in merge_on)]
            if len(matches) > 1:
                return _error(422, "INVALID_VALUE_FOR_COLUMN", "More than one record matches fieldsToMergeOn")
            if matches:
                record = matches[0]
                record["fields"] = dict(fields) if replace else {**record["fields"], **fields}
                updated.append(record["id"])
            else:
                record = {"id": f"rec{next(self._ids):014d}", "createdTime": _now(), "fields": dict(fields)}
                table.records.append(record)
                created.append(record["id"])
            result.append(_visible(record, None))
        return 200, {"records": result, "createdRecords": created, "updatedRecords": updated}


def _visible(record: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
    """A record as Airtable sends it: empty cells left out, and only the requested fields."""
    fields = {
        name: value
        for name, value in record["fields"].items()
        if value not in ("", None, [], False) and (wanted is None or name in wanted)
    }
    return {"id": record["id"], "createdTime": record["createdTime"], "fields": fields}


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _error(status: int, kind: str, message: str) -> Answer:
    return status, {"error": {"type": kind, "message": message}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_PATCH(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        path, _, query = self.path.partition("?")
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        auth = self.headers.get("Authorization") or ""
        fake: FakeAirtable = self.server.fake  # type: ignore[attr-defined]
        status, payload = fake.answer(
            self.command, path, urllib.parse.parse_qs(query), auth.removeprefix("Bearer "), body
        )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: failures show in assertions, not access logs."""
