"""The Batch API mode against the fake's /v1/files and /v1/batches, over real HTTP."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from finetune_kit.config import ModelPrice
from finetune_kit.errors import BatchFailedError, LLMError
from finetune_kit.llm import batch as batch_module
from finetune_kit.llm.batch import BatchReport, BatchStatus, prefill_with_batch
from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient, cached_result, request_hash
from finetune_kit.store import Store
from tests.fake_openai import FakeOpenAI, LineFailure, docs_responder, spec_violation

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-batch"
PRICE = ModelPrice(input=2.0, output=8.0)
DOCS = (
    "Quillstack runs on Linux and macOS. The server listens on port 7410 by default.",
    "Run quill init to create a quill.toml file. The file holds the project settings.",
    "Backups run nightly at two o'clock. Each backup is kept for thirty days.",
)
# Importable by the subprocess in the kill test, so both processes build the very same requests.
REQUESTS = [
    ChatRequest(
        stage="questions",
        messages=(
            ("system", "You write support questions."),
            ("user", f"Documentation:\n{doc}\nWrite 3 questions a user might ask about it.\nQuestions:\n1."),
        ),
        temperature=0.7,
        max_tokens=128,
        template_version="p1:000000000000",
    )
    for doc in DOCS
]
KILLABLE_PREFILL = """
import asyncio, sys
from pathlib import Path
from finetune_kit.llm.batch import prefill_with_batch
from finetune_kit.store import Store
from tests.test_batch import REQUESTS, endpoint_for
store = Store(Path(sys.argv[1]))
asyncio.run(prefill_with_batch(store, endpoint_for(sys.argv[2]), REQUESTS, run_id=None, poll_interval_s=0.05))
"""


def endpoint_for(url: str) -> Endpoint:
    return Endpoint(base_url=url, api_key=KEY, model="gpt-4o-mini", identity="fake-server", price=PRICE)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as opened:
        yield opened


def prefill(store: Store, url: str, requests: list[ChatRequest], **options: Any) -> BatchReport:
    """Run a prefill with fast polling."""
    polling: dict[str, Any] = {"poll_interval_s": 0.001, "max_poll_interval_s": 0.01}
    coroutine = prefill_with_batch(store, endpoint_for(url), requests, run_id=None, **(polling | options))
    return asyncio.run(coroutine)


def key(request: ChatRequest) -> str:
    return request_hash(endpoint_for("http://unused"), request)


def input_custom_ids(fake: FakeOpenAI) -> list[list[str]]:
    """The custom_ids of each batch's input file, in creation order."""
    files = fake.batch_api.files
    return [
        [json.loads(line)["custom_id"] for line in files[b.request["input_file_id"]].data.splitlines()]
        for b in fake.batch_api.batches.values()
    ]


def batch_cost(request: ChatRequest, content: str) -> float:
    """Half the list price of the tokens the fake counts (one per word)."""
    prompt = sum(len(text.split()) for _, text in request.messages)
    return 0.5 * (prompt * PRICE.input + len(content.split()) * PRICE.output) / 1_000_000


def test_round_trip_stores_every_answer_at_batch_price(fake: FakeOpenAI, store: Store) -> None:
    report = prefill(store, fake.url, REQUESTS)

    (batch_id,) = fake.batch_api.batches
    assert report == BatchReport(submitted=3, cached=0, merged=3, failed={}, batch_ids=[batch_id])
    for request in REQUESTS:
        result = cached_result(store, key(request))
        content = docs_responder(request.payload("gpt-4o-mini")).content
        assert result is not None
        assert (result.content, result.finish_reason) == (content, "stop")
        assert result.cost_usd == pytest.approx(batch_cost(request, content), rel=1e-12)
    assert fake.requests == []  # no live chat completion
    assert fake.invalid_requests == []


def test_input_file_holds_one_request_line_per_custom_id(fake: FakeOpenAI, store: Store) -> None:
    prefill(store, fake.url, REQUESTS)

    (batch,) = fake.batch_api.batches.values()
    uploaded = fake.batch_api.files[batch.request["input_file_id"]]
    lines = [json.loads(line) for line in uploaded.data.splitlines()]
    expected = [
        {
            "custom_id": key(r),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": r.payload("gpt-4o-mini"),
        }
        for r in sorted(REQUESTS, key=key)
    ]
    assert lines == expected
    assert uploaded.purpose == "batch"
    assert uploaded.filename.endswith(".jsonl")
    assert batch.request["endpoint"] == "/v1/chat/completions"
    assert batch.request["completion_window"] == "24h"
    assert batch.request["metadata"]["ftkit_stage"] == "questions"


def test_state_db_records_the_batch_and_its_requests(fake: FakeOpenAI, store: Store) -> None:
    prefill(store, fake.url, REQUESTS)

    (batch,) = fake.batch_api.batches.values()
    row = store.db.execute("SELECT * FROM batches").fetchone()
    assert (row["id"], row["stage"], row["input_file_id"], row["status"]) == (
        batch.id,
        "questions",
        batch.request["input_file_id"],
        "completed",
    )
    assert row["output_file_id"] == batch.output_file_id
    assert row["request_set"] == batch.request["metadata"]["ftkit_request_set"]
    assert row["merged_at"] is not None
    held = {
        r[0]
        for r in store.db.execute("SELECT request_hash FROM batch_requests WHERE batch_id = ?", (batch.id,))
    }
    assert held == {key(r) for r in REQUESTS}


def test_second_call_makes_no_http_request(fake: FakeOpenAI, store: Store) -> None:
    prefill(store, fake.url, REQUESTS)
    calls = list(fake.batch_api.calls)

    report = prefill(store, fake.url, REQUESTS)

    assert report == BatchReport(submitted=0, cached=3, merged=0, failed={}, batch_ids=[])
    assert fake.batch_api.calls == calls


def test_every_status_change_is_reported_once(fake: FakeOpenAI, store: Store) -> None:
    fake.batch_api.polls_per_step = 2
    seen: list[BatchStatus] = []

    prefill(store, fake.url, REQUESTS, on_status=seen.append)

    (batch_id,) = fake.batch_api.batches
    assert seen == [
        BatchStatus(batch_id, "validating", total=3, completed=0, failed=0),
        BatchStatus(batch_id, "in_progress", total=3, completed=0, failed=0),
        BatchStatus(batch_id, "finalizing", total=3, completed=0, failed=0),
        BatchStatus(batch_id, "completed", total=3, completed=3, failed=0),
    ]
    assert fake.batch_api.calls.count(f"GET /v1/batches/{batch_id}") == 6


def test_poll_interval_grows_by_half_up_to_the_maximum(fake: FakeOpenAI, store: Store) -> None:
    fake.batch_api.polls_per_step = 3  # completed at the 9th poll: 8 sleeps
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_module.asyncio, "sleep", recorded_sleep)
        prefill(store, fake.url, REQUESTS, poll_interval_s=2.0, max_poll_interval_s=10.0)

    assert sleeps == [2.0, 3.0, 4.5, 6.75, 10.0, 10.0, 10.0, 10.0]


def test_partially_cached_request_set_submits_only_the_uncached(fake: FakeOpenAI, store: Store) -> None:
    asyncio.run(_chat_live(store, fake.url, REQUESTS[0]))
    live_cost = store.scalar("SELECT cost_usd FROM llm_calls")

    report = prefill(store, fake.url, REQUESTS)

    assert (report.submitted, report.cached, report.merged) == (2, 1, 2)
    assert input_custom_ids(fake) == [sorted([key(REQUESTS[1]), key(REQUESTS[2])])]
    assert (
        store.scalar("SELECT cost_usd FROM llm_calls WHERE request_hash = ?", (key(REQUESTS[0]),))
        == live_cost
    )


async def _chat_live(store: Store, url: str, request: ChatRequest) -> None:
    client = LLMClient(endpoint_for(url), store, max_concurrency=1, max_retries=0, timeout_s=5.0)
    try:
        await client.chat(request)
    finally:
        await client.close()


def test_a_request_asked_twice_is_sent_once(fake: FakeOpenAI, store: Store) -> None:
    report = prefill(store, fake.url, [REQUESTS[0], REQUESTS[0]])

    assert (report.submitted, report.merged) == (1, 1)
    assert input_custom_ids(fake) == [[key(REQUESTS[0])]]


def test_large_request_sets_are_split_into_several_batches(
    fake: FakeOpenAI, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_module, "MAX_LINES", 2)

    report = prefill(store, fake.url, REQUESTS)

    assert report == BatchReport(
        submitted=3, cached=0, merged=3, failed={}, batch_ids=list(fake.batch_api.batches)
    )
    assert input_custom_ids(fake) == [sorted(map(key, REQUESTS))[:2], sorted(map(key, REQUESTS))[2:]]


def test_byte_limit_splits_too(fake: FakeOpenAI, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "MAX_BYTES", 1)  # every line is over it: one line per file

    report = prefill(store, fake.url, REQUESTS)

    assert len(report.batch_ids) == 3
    assert [len(ids) for ids in input_custom_ids(fake)] == [1, 1, 1]


def test_reattaches_after_the_submitting_process_was_killed(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.batch_api.polls_per_step = 10**9  # the batch stays in validating while the first process waits
    db = tmp_path / "state.db"
    Store(db).close()  # migrated before two processes open it
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_PREFILL, str(db), fake.url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stored_id = _wait_for_stored_batch(db, process)
        while fake.batch_api.batches[stored_id].polls == 0:  # it is waiting on the batch now
            time.sleep(0.01)
    finally:
        process.kill()  # SIGKILL: no cleanup runs
        process.wait()
    fake.batch_api.polls_per_step = 1

    with Store(db) as store:
        report = prefill(store, fake.url, REQUESTS)
        merged = store.scalar("SELECT count(*) FROM llm_calls")

    assert list(fake.batch_api.batches) == [stored_id]
    assert fake.batch_api.calls.count("POST /v1/batches") == 1
    assert report == BatchReport(submitted=0, cached=0, merged=3, failed={}, batch_ids=[stored_id])
    assert merged == 3


def _wait_for_stored_batch(db: Path, process: subprocess.Popen[bytes]) -> str:
    """The batch id the subprocess stores, polled from the state DB."""
    deadline = time.monotonic() + 60
    with Store(db) as store:
        while time.monotonic() < deadline:
            if (batch_id := store.scalar("SELECT id FROM batches")) is not None:
                return str(batch_id)
            if process.poll() is not None:
                pytest.fail(f"the prefill process exited early: {process.communicate()[1].decode()}")
            time.sleep(0.02)
    pytest.fail("the prefill process stored no batch id within 60 s")


def test_reattaches_to_a_batch_the_state_db_never_recorded(fake: FakeOpenAI, tmp_path: Path) -> None:
    fake.batch_api.polls_per_step = 10**9

    async def submit_then_abandon() -> None:
        with Store(tmp_path / "lost.db") as lost:
            task = asyncio.create_task(
                prefill_with_batch(lost, endpoint_for(fake.url), REQUESTS, run_id=None, poll_interval_s=0.01)
            )
            while not fake.batch_api.batches:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(submit_then_abandon())
    fake.batch_api.polls_per_step = 1

    with Store(tmp_path / "fresh.db") as store:  # knows nothing: only the batch's metadata can tell
        report = prefill(store, fake.url, REQUESTS)

    assert fake.batch_api.calls.count("POST /v1/batches") == 1
    assert report == BatchReport(
        submitted=0, cached=0, merged=3, failed={}, batch_ids=list(fake.batch_api.batches)
    )


def test_failed_lines_are_retried_once_then_reported(fake: FakeOpenAI, store: Store) -> None:
    always, once, invalid = (key(r) for r in REQUESTS)
    fake.batch_api.line_failures = {
        always: LineFailure(status=500),
        once: LineFailure(status=503, in_error_file=True, times=1),
        invalid: LineFailure(status=400, in_error_file=True),  # a second try cannot change a 400
    }

    report = prefill(store, fake.url, REQUESTS)

    assert input_custom_ids(fake) == [sorted([always, once, invalid]), sorted([always, once])]
    assert report == BatchReport(
        submitted=5,
        cached=0,
        merged=1,
        failed={
            always: "HTTP 500: Injected batch line failure.",
            invalid: "HTTP 400: Injected batch line failure.",
        },
        batch_ids=list(fake.batch_api.batches),
    )
    assert [r[0] for r in store.db.execute("SELECT request_hash FROM llm_calls")] == [once]


def test_a_line_missing_from_the_results_is_retried(fake: FakeOpenAI, store: Store) -> None:
    dropped = key(REQUESTS[0])
    fake.batch_api.line_failures = {dropped: LineFailure(status=None, times=1)}

    report = prefill(store, fake.url, REQUESTS)

    assert input_custom_ids(fake)[1] == [dropped]
    assert (report.merged, report.failed) == (3, {})


def test_expired_batch_keeps_its_answers_and_names_the_fix(fake: FakeOpenAI, store: Store) -> None:
    fake.batch_api.expire_after_lines = 1

    with pytest.raises(BatchFailedError) as raised:
        prefill(store, fake.url, REQUESTS)

    (batch_id,) = fake.batch_api.batches
    assert str(raised.value) == (
        f"batch {batch_id} expired after its 24h window with 1 of 3 requests answered (those are saved) "
        "— re-run to send the rest in a new batch, or drop --batch"
    )
    assert isinstance(raised.value, LLMError)
    assert store.scalar("SELECT count(*) FROM llm_calls") == 1
    assert store.scalar("SELECT merged_at IS NOT NULL FROM batches WHERE status = 'expired'") == 1

    fake.batch_api.expire_after_lines = None
    report = prefill(store, fake.url, REQUESTS)

    assert (report.submitted, report.cached, report.merged) == (2, 1, 2)


def test_cancelled_batch_raises_and_a_rerun_submits_again(fake: FakeOpenAI, store: Store) -> None:
    fake.batch_api.polls_per_step = 10**9

    def cancel_on_first_status(status: BatchStatus) -> None:
        if status.status == "validating":
            openai.OpenAI(base_url=fake.url, api_key=KEY).batches.cancel(status.batch_id)

    with pytest.raises(BatchFailedError) as raised:
        prefill(store, fake.url, REQUESTS, on_status=cancel_on_first_status)

    (batch_id,) = fake.batch_api.batches
    assert str(raised.value) == (
        f"batch {batch_id} was cancelled with 0 of 3 requests answered (those are saved) "
        "— re-run to send the rest in a new batch"
    )
    fake.batch_api.polls_per_step = 1
    assert prefill(store, fake.url, REQUESTS).submitted == 3


def test_batch_that_fails_validation_raises_with_the_servers_reason(fake: FakeOpenAI, store: Store) -> None:
    too_hot = ChatRequest(
        stage="questions", messages=(("user", "Hi"),), temperature=3.0, max_tokens=16, template_version="p1"
    )

    with pytest.raises(BatchFailedError) as raised:
        prefill(store, fake.url, [too_hot])

    (batch_id,) = fake.batch_api.batches
    assert str(raised.value) == (
        f"batch {batch_id} failed: 3.0 is greater than the maximum of 2 (at $.temperature) "
        "— fix the cause and re-run, or drop --batch"
    )
    assert len(fake.invalid_requests) == 1
    assert store.scalar("SELECT status FROM batches") == "failed"


def test_batch_unknown_to_the_server_is_given_up_and_resubmitted(fake: FakeOpenAI, store: Store) -> None:
    store.db.execute(
        "INSERT INTO batches(id, request_set, status, created_at, updated_at) VALUES ('batch_gone', 's1:x',"
        " 'in_progress', '2025-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00')"
    )
    store.db.execute(
        "INSERT INTO batch_requests(batch_id, request_hash) VALUES ('batch_gone', ?)", (key(REQUESTS[0]),)
    )

    with pytest.raises(BatchFailedError) as raised:
        prefill(store, fake.url, REQUESTS)

    assert str(raised.value) == (
        f"batch batch_gone is unknown to {fake.url} (deleted, or created with another API key's project) "
        "— re-run to submit its requests in a new batch"
    )
    assert store.scalar("SELECT status FROM batches WHERE id = 'batch_gone'") == "failed"
    assert prefill(store, fake.url, REQUESTS).merged == 3


def test_wrong_api_key_names_the_fix(fake: FakeOpenAI, store: Store) -> None:
    endpoint = Endpoint(base_url=fake.url, api_key="sk-wrong", model="gpt-4o-mini", identity="fake-server")

    with pytest.raises(LLMError) as raised:
        asyncio.run(prefill_with_batch(store, endpoint, REQUESTS, run_id=None))

    assert str(raised.value) == (
        f"{fake.url} rejected the API key (401) while listing batches — check OPENAI_API_KEY"
    )


def test_unreachable_server_names_the_fix(store: Store) -> None:
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens

    with pytest.raises(LLMError) as raised:
        prefill(store, url, REQUESTS)

    assert str(raised.value) == (
        f"cannot reach {url} while listing batches — check the network and re-run "
        "(a submitted batch is picked up again, not sent twice)"
    )


# --- The fake's batch API itself ----------------------------------------------------------------------


def test_fake_batch_routes_answer_in_the_specs_shapes(fake: FakeOpenAI, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
            }
        )
        + "\n"
    )

    uploaded = sdk.files.with_raw_response.create(file=path, purpose="batch")
    file_id = uploaded.parse().id
    created = sdk.batches.with_raw_response.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch_id = created.parse().id
    polled = [sdk.batches.with_raw_response.retrieve(batch_id) for _ in range(3)]
    listed = sdk.batches.with_raw_response.list(limit=1)

    raw = [
        (json.loads(uploaded.text), "OpenAIFile"),
        (json.loads(sdk.files.with_raw_response.retrieve(file_id).text), "OpenAIFile"),
        (json.loads(created.text), "Batch"),
        *((json.loads(p.text), "Batch") for p in polled),
        (json.loads(listed.text), "ListBatchesResponse"),
    ]
    assert [spec_violation(body, schema) for body, schema in raw] == [None] * len(raw)
    assert [json.loads(p.text)["status"] for p in polled] == ["in_progress", "finalizing", "completed"]
    assert sdk.files.content(file_id).content == path.read_bytes()


def test_fake_lists_batches_newest_first_in_pages(fake: FakeOpenAI, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
            }
        )
        + "\n"
    )
    file_id = sdk.files.create(file=path, purpose="batch").id
    ids = [
        sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]

    first = sdk.batches.list(limit=2)

    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more is True
    assert [b.id for b in sdk.batches.list(limit=2)] == ids[::-1]  # the SDK pages on with `after`


def test_fake_refuses_a_batch_over_a_file_of_another_purpose(fake: FakeOpenAI, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    path = tmp_path / "train.jsonl"
    path.write_text("{}\n")
    file_id = sdk.files.create(file=path, purpose="fine-tune").id

    with pytest.raises(openai.BadRequestError) as raised:
        sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")

    assert raised.value.status_code == 400
    assert raised.value.body == {
        "message": f"Invalid 'input_file_id': '{file_id}' is not a file with purpose 'batch'.",
        "type": "invalid_request_error",
        "param": "input_file_id",
        "code": None,
    }
