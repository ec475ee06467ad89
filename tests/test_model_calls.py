"""One way to call a model: one module builds SDK clients and maps SDK errors; one retry policy for every caller."""

import ast
import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_kit.ask import ask
from finetune_kit.cli import app
from finetune_kit.config import load_settings
from finetune_kit.errors import FtkitError
from finetune_kit.llm.client import ChatRequest, Endpoint, LLMClient
from finetune_kit.slack.answerer import OpenAIAnswerer, Turn
from finetune_kit.store import Store
from tests.conftest import SAMPLE_DOCS, TEST_KEY
from tests.fake_openai import FakeOpenAI, Reply

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_kit"
SDK_MODULE = "finetune_kit/llm/api.py"
CLIENT_CLASSES = {"OpenAI", "AsyncOpenAI", "AzureOpenAI", "AsyncAzureOpenAI"}
ANSWER = "Port 8080."
REQUEST = ChatRequest(
    stage="questions",
    messages=(("user", "Which port does Acme use?"),),
    temperature=0.0,
    max_tokens=32,
    template_version="p1:000000000000",
)
RETRY_NOW = {"Retry-After": "0"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), str(path))


def openai_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> openai attribute, for `from openai import X [as Y]`."""
    return {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "openai"
        for alias in node.names
    }


def sdk_attribute(node: ast.expr, imported: dict[str, str]) -> str | None:
    """`X` for an expression `openai.X` (or a name imported from openai), else None."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "openai":
        return node.attr
    return imported.get(node.id) if isinstance(node, ast.Name) else None


def test_sdk_clients_are_constructed_in_exactly_one_module() -> None:
    constructing = set()
    for name, tree in modules():
        imported = openai_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and sdk_attribute(node.func, imported) in CLIENT_CLASSES:
                constructing.add(name)

    assert constructing == {SDK_MODULE}


def test_sdk_exception_classes_are_mapped_in_exactly_one_module() -> None:
    mapping = set()
    for name, tree in modules():
        imported = openai_names(tree)
        for node in ast.walk(tree):
            attribute = sdk_attribute(node, imported) if isinstance(node, ast.expr) else None
            if attribute is not None and attribute.endswith("Error"):
                mapping.add(name)

    assert mapping == {SDK_MODULE}


# --- one retry policy and one mapping, as generation, the bot and `ask` use them -------------------------


def endpoint_for(url: str, api_key: str = TEST_KEY) -> Endpoint:
    return Endpoint(base_url=url, api_key=api_key, model="gpt-4o-mini", identity="fake-server")


def generate(url: str, store: Store) -> str:
    async def run() -> str:
        client = LLMClient(endpoint_for(url), store, max_concurrency=2, max_retries=2, timeout_s=5.0)
        try:
            return (await client.chat(REQUEST)).content
        finally:
            await client.close()

    return asyncio.run(run())


def answerer_for(url: str, stream: bool) -> OpenAIAnswerer:
    return OpenAIAnswerer(
        endpoint_for(url),
        system_prompt="You answer questions about Acme.",
        temperature=0.0,
        max_tokens=32,
        context_tokens=4096,
        timeout_s=10.0,
        max_concurrency=2,
        stream=stream,
    )


def bot_answer(url: str, stream: bool) -> str:
    answerer = answerer_for(url, stream)
    try:
        return answerer.answer([Turn("user", "Which port does Acme use?")])
    finally:
        answerer.close()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(lambda body: Reply(ANSWER), api_key=TEST_KEY) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "s.db") as opened:
        yield opened


@pytest.mark.parametrize("status", [408, 409, 429, 500, 503])
def test_generation_and_the_bot_retry_the_same_failures(fake: FakeOpenAI, store: Store, status: int) -> None:
    fake.queue(Reply("try again", status=status, headers=RETRY_NOW))
    assert generate(fake.url, store) == ANSWER
    fake.queue(Reply("try again", status=status, headers=RETRY_NOW))
    assert bot_answer(fake.url, stream=True) == ANSWER

    assert len(fake.requests) == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_generation_and_the_bot_map_a_final_failure_to_the_same_error_without_retrying(
    fake: FakeOpenAI, store: Store, status: int
) -> None:
    fake.responder = lambda body: Reply("no", status=status)
    with pytest.raises(FtkitError) as generating:
        generate(fake.url, store)
    with pytest.raises(FtkitError) as answering:
        bot_answer(fake.url, stream=False)

    assert type(answering.value.__cause__) is type(generating.value)
    assert str(answering.value) == f"HTTP {status}: no"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("stream", [True, False])
def test_the_bot_streams_or_not_through_the_same_call(fake: FakeOpenAI, stream: bool) -> None:
    answerer = answerer_for(fake.url, stream)
    seen: list[str] = []
    try:
        text = answerer.answer([Turn("user", "Which port?")], seen.append)
    finally:
        answerer.close()

    assert text == ANSWER
    assert seen == (["Port ", ANSWER] if stream else [])
    assert [bool(body.get("stream")) for body in fake.requests] == [stream]


def test_ask_retries_what_generation_retries(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    fake.queue(Reply("conflict", status=409, headers=RETRY_NOW))

    answer = ask(load_settings(workspace=Path("ws")), "Which port?", model="gpt-4o-mini")

    assert (answer.model, answer.text, len(fake.requests)) == ("gpt-4o-mini", ANSWER, 2)


# --- a wrong key stops the stage at the first 401 ------------------------------------------------------


class RefusalOnceAllArrived:
    """Refuses every request, but holds the first `hold` until all of them are in: that many are in flight."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.arrived = 0
        self.in_flight_at_first_refusal: int | None = None
        self.lock = threading.Lock()
        self.all_in = threading.Event()

    def __call__(self, body: dict) -> Reply:
        with self.lock:
            self.arrived += 1
            if self.arrived >= self.hold:
                self.all_in.set()
        self.all_in.wait(timeout=10)
        with self.lock:
            if self.in_flight_at_first_refusal is None:
                self.in_flight_at_first_refusal = self.arrived
        return Reply("Incorrect API key provided.", status=401)


def test_a_wrong_key_stops_the_stage_at_the_first_401(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_kit.llm.window import START_SIZE  # what is in flight before any response: the first round

    # max_concurrency holds the window at the first round: it would grow while the server is silent
    first_round = START_SIZE
    refusal = RefusalOnceAllArrived(hold=first_round)
    with FakeOpenAI(refusal) as server:
        url = server.url
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        monkeypatch.setenv("FTKIT_MAX_CONCURRENCY", str(first_round))
        result = CliRunner().invoke(app, ["--workspace", "ws", "run", str(SAMPLE_DOCS)])
        sent = len(server.requests)

    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {url} rejected the API key (401) — check OPENAI_API_KEY\n",
    )
    assert refusal.in_flight_at_first_refusal == first_round
    assert sent == first_round  # nothing was sent after the first 401
