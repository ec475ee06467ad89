"""The Batch API mode: fetch a stage's requests through OpenAI batches (half price) into the request cache."""

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import openai
from openai.types import Batch

from finetune_kit.errors import BatchFailedError, ResourceNotFoundError
from finetune_kit.llm.api import ApiCall, RetryPolicy, Wording, async_client, one_line, request
from finetune_kit.llm.client import ChatRequest, Endpoint, cached_result, record_response, request_hash
from finetune_kit.store import Store, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_URL: Final = "/v1/chat/completions"
BATCH_PRICE_FACTOR = 0.5  # the Batch API bills tokens at half the synchronous price
MAX_LINES = 50_000  # the Batch API's limit per input file
MAX_BYTES = 190_000_000  # under its 200 MB limit, with room for the upload's envelope
METADATA_KEY = "ftkit_request_set"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# A batch is terminal 24h after creation; older ones on the server need no re-attaching.
REMOTE_LOOKBACK_S = 25 * 3600
# Answers a second try cannot change: reported at once rather than retried.
FINAL_HTTP_STATUSES = frozenset({400, 401, 403, 404, 422})
API_RETRIES = 2  # per call to the Files and Batch APIs (a batch's creation is never sent twice)
KEPT = "(a submitted batch is picked up again, not sent twice)"
BATCH_WORDING = Wording(
    refused_key="{url} rejected the API key (401) while {doing} — check OPENAI_API_KEY",
    unreachable="cannot reach {url} while {doing} — check the network and re-run " + KEPT,
    forbidden="{url} refused {doing} (HTTP 403): {message} — check that the key may use the Batch API",
    not_found="{url} answered 404 while {doing} — it may not offer the Batch API; drop --batch",
    rejected="{url} answered HTTP {status} while {doing}: {message} — fix the request or drop --batch",
    failed="{url} answered HTTP {status} while {doing}: {message} — re-run later " + KEPT,
)


@dataclass(frozen=True)
class BatchStatus:
    """One batch's state and request counts, reported whenever either changes."""

    batch_id: str
    status: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True)
class BatchReport:
    """What one prefill did; `failed` maps a request hash (the line's custom_id) to why it got no answer."""

    submitted: int
    cached: int
    merged: int
    failed: dict[str, str]
    batch_ids: list[str]


@dataclass(frozen=True)
class _Failure:
    reason: str
    retryable: bool


@dataclass(frozen=True)
class _Polling:
    interval_s: float
    max_interval_s: float
    on_status: Callable[[BatchStatus], None] | None


async def prefill_with_batch(
    store: Store,
    endpoint: Endpoint,
    requests: list[ChatRequest],
    *,
    run_id: int | None,
    poll_interval_s: float = 30.0,
    max_poll_interval_s: float = 300.0,
    on_status: Callable[[BatchStatus], None] | None = None,
) -> BatchReport:
    """Store a response for every request, fetching the uncached ones through (re-attachable) OpenAI batches.

    A line that fails is sent once more in a follow-up batch, unless its answer cannot change (HTTP 400, 401,
    403, 404, 422); what still fails is returned in `failed`. A batch that fails, expires or is cancelled
    raises BatchFailedError after its answered lines are stored.
    """
    wanted = {request_hash(endpoint, request): request for request in requests}
    pending = {key: request for key, request in wanted.items() if cached_result(store, key) is None}
    if not pending:
        return BatchReport(submitted=0, cached=len(wanted), merged=0, failed={}, batch_ids=[])
    sdk = async_client(endpoint.base_url, endpoint.api_key)
    runner = _BatchRunner(
        store, endpoint, sdk, run_id, _Polling(poll_interval_s, max_poll_interval_s, on_status)
    )
    try:
        failures = await runner.settle(pending)
        if retry := {key: pending[key] for key, failure in failures.items() if failure.retryable}:
            failures = {key: f for key, f in failures.items() if not f.retryable} | await runner.settle(retry)
    finally:
        await sdk.close()
    return BatchReport(
        submitted=runner.submitted,
        cached=len(wanted) - len(pending),
        merged=runner.merged,
        failed={key: failure.reason for key, failure in failures.items()},
        batch_ids=runner.batch_ids,
    )


class _BatchRunner:
    """Submits, re-attaches to, waits on and merges the batches of one prefill."""

    def __init__(
        self, store: Store, endpoint: Endpoint, sdk: openai.AsyncOpenAI, run_id: int | None, polling: _Polling
    ) -> None:
        self.store = store
        self.endpoint = endpoint
        self.sdk = sdk
        self.run_id = run_id
        self.polling = polling
        self.submitted = 0
        self.merged = 0
        self.batch_ids: list[str] = []

    async def _request(self, send: Callable[[], Awaitable[T]], doing: str, retries: int = API_RETRIES) -> T:
        """One call to the Files or Batch API, retried by the shared policy, its failure naming the fix."""
        call = ApiCall(self.endpoint.base_url, self.endpoint.api_key, BATCH_WORDING, doing=doing)
        return await request(send, call, RetryPolicy(retries))

    async def settle(self, pending: dict[str, ChatRequest]) -> dict[str, _Failure]:
        """Get every pending request through a batch (an open one if it holds it); returns the failed lines."""
        batches = _open_batches(self.store, set(pending))
        covered = set().union(*batches.values())
        if uncovered := {key: request for key, request in pending.items() if key not in covered}:
            batches |= await self._submit(uncovered)
        failures: dict[str, _Failure] = {}
        errors: list[BatchFailedError] = []
        for batch_id, keys in batches.items():
            self.batch_ids.append(batch_id)
            batch = await self._wait(batch_id)
            merged, failed = await self._merge(batch, keys, pending)
            failures |= failed
            if (error := _batch_error(batch, merged)) is not None:
                errors.append(error)
        if errors:
            raise errors[0]
        return failures

    async def _submit(self, pending: dict[str, ChatRequest]) -> dict[str, set[str]]:
        """Send the requests in as few batches as the limits allow, each stored before anything waits on it."""
        submitted: dict[str, set[str]] = {}
        unrecorded = await self._unrecorded_remote_batches()
        for lines in _input_files(pending, self.endpoint.model):
            request_set = _request_set(lines)
            stage = ",".join(sorted({pending[key].stage for key in lines}))
            batch = unrecorded.get(request_set)
            if batch is None:
                batch = await self._create(lines, request_set, stage)
                self.submitted += len(lines)
            else:
                log.info("re-attaching to batch %s, created before the state database recorded it", batch.id)
            _record_batch(self.store, batch, request_set, stage, list(lines))
            submitted[batch.id] = set(lines)
        return submitted

    async def _unrecorded_remote_batches(self) -> dict[str, Batch]:
        """Recent usable batches on the server that carry a request set but are missing from the state DB.

        That happens when a process is killed between creating a batch and storing its id.
        """
        known = {row[0] for row in self.store.db.execute("SELECT id FROM batches")}
        found: dict[str, Batch] = {}
        for batch in await self._request(self._recent_batches, "listing batches"):
            request_set = (batch.metadata or {}).get(METADATA_KEY)
            usable = batch.status not in ("failed", "expired", "cancelling", "cancelled")
            if request_set and usable and batch.id not in known:
                found.setdefault(request_set, batch)
        return found

    async def _recent_batches(self) -> list[Batch]:
        """The batches on the server created within the lookback, newest first."""
        since = time.time() - REMOTE_LOOKBACK_S
        recent: list[Batch] = []
        async for batch in self.sdk.batches.list(limit=100):
            if batch.created_at < since:
                break
            recent.append(batch)
        return recent

    async def _create(self, lines: dict[str, bytes], request_set: str, stage: str) -> Batch:
        """Upload one JSONL input file and create a batch over it."""
        with tempfile.TemporaryDirectory(prefix="ftkit-batch-") as folder:
            path = Path(folder) / f"ftkit-{request_set.removeprefix('s1:')[:16]}.jsonl"
            path.write_bytes(b"".join(lines.values()))
            uploaded = await self._request(
                lambda: self.sdk.files.create(file=path, purpose="batch"), "uploading the batch input file"
            )
        # No retry: a retried create whose first try did reach the server would start a second batch.
        batch = await self._request(
            lambda: self.sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint=BATCH_URL,
                completion_window="24h",
                metadata={METADATA_KEY: request_set, "ftkit_stage": stage},
            ),
            "creating a batch",
            retries=0,
        )
        log.info("submitted batch %s with %d requests", batch.id, len(lines))
        return batch

    async def _wait(self, batch_id: str) -> Batch:
        """Poll a batch until it is terminal, at growing intervals, storing and reporting every change."""
        interval = self.polling.interval_s
        last: BatchStatus | None = None
        while True:
            batch = await self._retrieve(batch_id)
            if (status := _status(batch)) != last:
                _store_status(self.store, batch)
                if self.polling.on_status is not None:
                    self.polling.on_status(status)
                last = status
            if batch.status in TERMINAL:
                return batch
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self.polling.max_interval_s)

    async def _retrieve(self, batch_id: str) -> Batch:
        """The batch's state; one the server does not know is marked failed, so no re-run waits on it again."""
        try:
            return await self._request(
                lambda: self.sdk.batches.retrieve(batch_id), f"polling batch {batch_id}"
            )
        except ResourceNotFoundError as exc:
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE batches SET status = 'failed', updated_at = ? WHERE id = ?", (utc_now(), batch_id)
                )
            raise BatchFailedError(
                f"batch {batch_id} is unknown to {self.endpoint.base_url} (deleted, or created with another "
                "API key's project) — re-run to submit its requests in a new batch"
            ) from exc

    async def _merge(
        self, batch: Batch, keys: set[str], pending: dict[str, ChatRequest]
    ) -> tuple[int, dict[str, _Failure]]:
        """Store every answered line at batch price and mark the batch merged, in one transaction.

        Returns how many lines were stored and, for the pending requests that got no answer, why.
        """
        if batch.status == "failed":
            return 0, {}
        lines = [*await self._lines(batch.output_file_id), *await self._lines(batch.error_file_id)]
        answered: dict[str, dict[str, Any]] = {}
        failures: dict[str, _Failure] = {}
        for line in lines:
            key = line.get("custom_id")
            if not isinstance(key, str) or key not in pending:
                continue
            if (body := _completion(line)) is not None:
                answered[key] = body
            else:
                failures[key] = _line_failure(line)
        if batch.status == "completed":
            for key in sorted((keys & pending.keys()) - answered.keys() - failures.keys()):
                failures[key] = _Failure(
                    f"batch {batch.id} returned no result for this request", retryable=True
                )
        with self.store.transaction() as db:
            for key, body in answered.items():
                record_response(
                    self.store, self.endpoint, pending[key], body, self.run_id, BATCH_PRICE_FACTOR
                )
            db.execute(
                "UPDATE batches SET merged_at = ?, updated_at = ? WHERE id = ?",
                (utc_now(), utc_now(), batch.id),
            )
        self.merged += len(answered)
        log.info("merged batch %s: %d answered, %d failed", batch.id, len(answered), len(failures))
        return len(answered), failures

    async def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        """The JSON objects of a result file; other lines are skipped (their requests count as unanswered)."""
        if not file_id:
            return []
        content = await self._request(
            lambda: self.sdk.files.content(file_id), f"downloading batch results {file_id}"
        )
        lines: list[dict[str, Any]] = []
        for number, text in enumerate(content.text.splitlines(), 1):
            try:
                line = json.loads(text) if text.strip() else None
            except ValueError:
                line = None
                log.warning("%s line %d is not JSON; skipped", file_id, number)
            if isinstance(line, dict):
                lines.append(line)
        return lines


def _input_files(pending: dict[str, ChatRequest], model: str) -> list[dict[str, bytes]]:
    """JSONL lines keyed by custom_id (the request hash), in a stable order, split to fit the file limits."""
    files: list[dict[str, bytes]] = [{}]
    size = 0
    for key in sorted(pending):
        line = {"custom_id": key, "method": "POST", "url": BATCH_URL, "body": pending[key].payload(model)}
        data = (json.dumps(line) + "\n").encode()
        if files[-1] and (len(files[-1]) >= MAX_LINES or size + len(data) > MAX_BYTES):
            files.append({})
            size = 0
        files[-1][key] = data
        size += len(data)
    return files


def _request_set(keys: Iterable[str]) -> str:
    """A versioned hash of a set of request hashes: the same requests always give the same value."""
    return "s1:" + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:40]


def _open_batches(store: Store, keys: set[str]) -> dict[str, set[str]]:
    """Batches not yet merged (and not failed) that hold any of these requests, with all their request hashes."""
    rows = store.db.execute(
        "SELECT id FROM batches WHERE merged_at IS NULL AND coalesce(status, '') != 'failed' ORDER BY created_at, id"
    ).fetchall()
    found: dict[str, set[str]] = {}
    for row in rows:
        held = {
            r[0]
            for r in store.db.execute("SELECT request_hash FROM batch_requests WHERE batch_id = ?", (row[0],))
        }
        if held & keys:
            found[row[0]] = held
    return found


def _record_batch(store: Store, batch: Batch, request_set: str, stage: str, keys: list[str]) -> None:
    """Store a batch's ids and the requests it holds, so a re-run re-attaches instead of submitting again."""
    now = utc_now()
    with store.transaction() as db:
        db.execute(
            "INSERT OR IGNORE INTO batches(id, request_set, stage, input_file_id, status, output_file_id,"
            " error_file_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                batch.id,
                request_set,
                stage,
                batch.input_file_id,
                batch.status,
                batch.output_file_id,
                batch.error_file_id,
                now,
                now,
            ),
        )
        db.executemany(
            "INSERT OR IGNORE INTO batch_requests(batch_id, request_hash) VALUES (?, ?)",
            [(batch.id, key) for key in keys],
        )


def _store_status(store: Store, batch: Batch) -> None:
    """Record a batch's latest status and result file ids."""
    store.db.execute(
        "UPDATE batches SET status = ?, output_file_id = ?, error_file_id = ?, updated_at = ? WHERE id = ?",
        (batch.status, batch.output_file_id, batch.error_file_id, utc_now(), batch.id),
    )


def _status(batch: Batch) -> BatchStatus:
    counts = batch.request_counts
    return BatchStatus(
        batch_id=batch.id,
        status=batch.status,
        total=counts.total if counts else 0,
        completed=counts.completed if counts else 0,
        failed=counts.failed if counts else 0,
    )


def _completion(line: dict[str, Any]) -> dict[str, Any] | None:
    """The chat.completion of a line answered with HTTP 200, else None."""
    response = _mapping(line.get("response"))
    body = _mapping(response.get("body"))
    return body if response.get("status_code") == 200 and body.get("choices") else None


def _line_failure(line: dict[str, Any]) -> _Failure:
    """Why a result line holds no answer, and whether a second try could change that."""
    response = _mapping(line.get("response"))
    error = _mapping(line.get("error")) or _mapping(_mapping(response.get("body")).get("error"))
    message = one_line(str(error.get("message") or "no error message"))
    status = response.get("status_code")
    if status is None:
        return _Failure(f"{error.get('code') or 'error'}: {message}", retryable=True)
    if status == 200:
        return _Failure("HTTP 200 without a chat completion in the body", retryable=True)
    return _Failure(f"HTTP {status}: {message}", retryable=status not in FINAL_HTTP_STATUSES)


def _batch_error(batch: Batch, merged: int) -> BatchFailedError | None:
    """The error a batch that did not complete ends in, naming its id and the fix; None for a completed one."""
    if batch.status == "failed":
        reasons = "; ".join(e.message for e in (batch.errors.data or []) if e.message) if batch.errors else ""
        return BatchFailedError(
            f"batch {batch.id} failed: {one_line(reasons or 'no reason given')} — fix the cause and re-run, "
            "or drop --batch"
        )
    total = batch.request_counts.total if batch.request_counts else 0
    if batch.status == "expired":
        return BatchFailedError(
            f"batch {batch.id} expired after its 24h window with {merged} of {total} requests answered (those are "
            "saved) — re-run to send the rest in a new batch, or drop --batch"
        )
    if batch.status == "cancelled":
        return BatchFailedError(
            f"batch {batch.id} was cancelled with {merged} of {total} requests answered (those are saved) — "
            "re-run to send the rest in a new batch"
        )
    return None


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
