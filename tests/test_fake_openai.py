"""The fake OpenAI server speaks the spec to the real `openai` SDK, over real HTTP."""

import json
from collections.abc import Iterator

try:  # openai 3.x ships httpx2; older SDKs use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import REPO
from tests.fake_openai import SPEC_PATH, FakeOpenAI, Reply, docs_responder, spec_violation

KEY = "sk-test-fake"
DOC = """# Installation

Quillstack runs on Linux and macOS. The server listens on port 7410 by default.
Run `quill init` to create a quill.toml file in the current directory.
"""
QUESTION_PROMPT = f"Documentation:\n{DOC}\nWrite 3 questions a user might ask about it.\nQuestions:\n1."
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY) as server:
        yield server


def client_for(fake: FakeOpenAI, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0, **options)  # type: ignore[arg-type]


def test_spec_is_found_inside_the_repo() -> None:
    assert SPEC_PATH.is_file()
    assert SPEC_PATH.is_relative_to(REPO / "tests" / "fixtures")


def test_completion_round_trip(fake: FakeOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION_PROMPT}]
    completion = client_for(fake).chat.completions.create(model="fake-model", messages=messages)

    assert completion.model == "fake-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == (
        "1. What does the documentation say about Installation?\n"
        "2. What details are given about Quillstack runs on Linux and macOS?\n"
        "3. What should a user know about The server listens on port 7410 by default?"
    )
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert fake.requests == [{"model": "fake-model", "messages": messages}]
    assert fake.invalid_requests == []


def test_raw_replies_match_the_spec(fake: FakeOpenAI) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
    completion = httpx.post(f"{fake.url}/chat/completions", json=body, headers=AUTH)
    models = httpx.get(f"{fake.url}/models", headers=AUTH)
    missing = httpx.get(f"{fake.url}/nowhere", headers=AUTH)

    assert spec_violation(completion.json(), "CreateChatCompletionResponse") is None
    assert spec_violation(models.json(), "ListModelsResponse") is None
    assert missing.status_code == 404
    assert spec_violation(missing.json(), "ErrorResponse") is None
    assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"


def test_models_are_listed(fake: FakeOpenAI) -> None:
    assert [m.id for m in client_for(fake).models.list()] == ["gpt-4o-mini", "fake-model"]


def test_streaming_with_usage(fake: FakeOpenAI) -> None:
    fake.queue(Reply(content="Port 7410 is the default."))
    stream = client_for(fake).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Which port?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Port 7410 is the default."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_stream_events_match_the_spec(fake: FakeOpenAI) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = httpx.post(f"{fake.url}/chat/completions", json=body, headers=AUTH)
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    violations = [spec_violation(json.loads(e), "CreateChatCompletionStreamResponse") for e in events[:-1]]

    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert events[-1] == "[DONE]"
    assert violations == [None] * len(violations)


@pytest.mark.parametrize("api_key", ["sk-wrong", "sk-test-fake-but-longer"])
def test_wrong_key_is_refused(fake: FakeOpenAI, api_key: str) -> None:
    client = openai.OpenAI(base_url=fake.url, api_key=api_key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model="m", messages=HI)

    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert api_key not in str(raised.value)


def test_missing_key_is_refused(fake: FakeOpenAI) -> None:
    response = httpx.get(f"{fake.url}/models")

    assert response.status_code == 401
    assert response.json() == {
        "error": {
            "message": "You didn't provide an API key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_queued_rate_limit_is_raised_then_the_queue_moves_on(fake: FakeOpenAI) -> None:
    fake.queue(Reply(status=429, headers={"Retry-After": "0"}), Reply(content="second"))
    client = client_for(fake)

    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="m", messages=HI)
    later = client.chat.completions.create(model="m", messages=HI)

    assert raised.value.response.headers["Retry-After"] == "0"
    assert raised.value.code == "rate_limit_exceeded"
    assert later.choices[0].message.content == "second"


def test_sdk_retries_after_a_queued_rate_limit(fake: FakeOpenAI) -> None:
    fake.queue(Reply(status=429, headers={"Retry-After": "0"}), Reply(content="after retry"))
    client = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=1)
    completion = client.chat.completions.create(model="m", messages=HI)

    assert completion.choices[0].message.content == "after retry"
    assert len(fake.requests) == 2


def test_slow_reply_times_out(fake: FakeOpenAI) -> None:
    fake.queue(Reply(content="too late", delay_s=5))
    with pytest.raises(openai.APITimeoutError):
        client_for(fake, timeout=0.2).chat.completions.create(model="m", messages=HI)


def test_invalid_body_is_refused_and_recorded(fake: FakeOpenAI) -> None:
    response = httpx.post(f"{fake.url}/chat/completions", json={"model": "m"}, headers=AUTH)

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "'messages' is a required property (at $)"
    assert [bad.message for bad in fake.invalid_requests] == ["'messages' is a required property (at $)"]


def test_nullable_fields_are_accepted(fake: FakeOpenAI) -> None:
    client_for(fake).chat.completions.create(model="m", messages=HI, max_tokens=None, seed=None, stop=None)

    assert {k: fake.requests[0][k] for k in ("max_tokens", "seed", "stop")} == dict.fromkeys(
        ("max_tokens", "seed", "stop")
    )
    assert fake.invalid_requests == []


def test_questions_depend_on_the_chunk() -> None:
    def ask(doc: str) -> str:
        return docs_responder(
            {"messages": [{"role": "user", "content": f"Documentation:\n{doc}\nQuestions:\n1."}]}
        ).content

    first = ask("## Rollouts\n\nA rollout sends a flag to a percentage of users.")
    second = ask("## Webhooks\n\nQuillstack posts flag changes to your webhook URL.")

    assert first.splitlines()[0] == "1. What does the documentation say about Rollouts?"
    assert second.splitlines()[0] == "1. What does the documentation say about Webhooks?"
    assert all(line.endswith("?") for line in first.splitlines() + second.splitlines())


def test_answer_quotes_the_best_matching_sentence() -> None:
    prompt = f"Documentation:\n{DOC}\nQuestion: Which port does the server listen on?\nAnswer:"
    reply = docs_responder({"messages": [{"role": "user", "content": prompt}]})

    assert reply.content == 'The documentation says: "The server listens on port 7410 by default."'
