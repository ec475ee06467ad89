"""A fake OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, bodies checked against the spec."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"
MODEL_IDS = ("gpt-4o-mini", "fake-model")
SPEC_SCHEMA_NAMES = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "ErrorResponse",
)
# Bump when the extraction below changes, so stale on-disk caches are ignored.
_EXTRACTION_VERSION = "1"
_SPEC_URI = "urn:openai-openapi"


@dataclass
class Reply:
    """What the fake answers to one chat completion."""

    content: str = ""
    finish_reason: str = "stop"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class InvalidRequest:
    """A chat completion body that the OpenAI spec rejects, and why."""

    message: str
    body: object


Responder = Callable[[dict], Reply]


# --- The OpenAI spec ---------------------------------------------------------------------------------


def _referenced_names(node: object) -> Iterator[str]:
    """Names of the component schemas that `node` refers to directly."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/schemas/"):
                yield value.rsplit("/", 1)[1]
            else:
                yield from _referenced_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _referenced_names(item)


def _schema_closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The root schemas and every schema they reach through `$ref`."""
    closure: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name not in closure:
            closure[name] = schemas[name]
            pending.extend(_referenced_names(schemas[name]))
    return closure


def _translate_nullable(node: Any) -> Any:
    """Rewrite OpenAPI 3.0's `nullable: true` (which JSON Schema 2020-12 ignores) as `anyOf [null, ...]`."""
    if isinstance(node, list):
        return [_translate_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    translated = {key: _translate_nullable(value) for key, value in node.items()}
    if translated.pop("nullable", False) is True:
        return {"anyOf": [{"type": "null"}, translated]}
    return translated


def _extract_schemas(spec_path: Path) -> dict[str, Any]:
    """Parse the whole YAML spec (about 1 s) and keep the schemas the fake needs as a JSON Schema doc."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = yaml.load(spec_path.read_text(encoding="utf-8"), Loader=loader)
    closure = _schema_closure(spec["components"]["schemas"], SPEC_SCHEMA_NAMES)
    return {"components": {"schemas": _translate_nullable(closure)}}


@functools.cache
def spec_schemas(spec_path: Path = SPEC_PATH) -> dict[str, Any]:
    """The needed subtree of the spec, cached as JSON on disk (keyed by the spec's hash) and in memory."""
    digest = hashlib.sha256(spec_path.read_bytes() + _EXTRACTION_VERSION.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"ftkit-openai-schemas-{digest}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    document = _extract_schemas(spec_path)
    # Written under a temporary name and renamed, so a parallel test process never reads half a file.
    fd, tmp_name = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(document, tmp)
        os.replace(tmp_name, cache)
    except OSError:  # e.g. another user's cache file in a shared /tmp: the in-memory copy still serves
        Path(tmp_name).unlink(missing_ok=True)
    return document


@functools.cache
def spec_validator(name: str) -> Draft202012Validator:
    """A validator for one component schema of the OpenAI spec, e.g. "CreateChatCompletionRequest"."""
    resource = Resource.from_contents(spec_schemas(), default_specification=DRAFT202012)
    registry: Registry = Registry().with_resource(_SPEC_URI, resource)
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#/components/schemas/{name}"}, registry=registry)


def spec_violation(instance: object, name: str) -> str | None:
    """Why `instance` does not match the spec's schema `name`, or None when it does."""
    error = best_match(spec_validator(name).iter_errors(instance))
    if error is None:
        return None
    return f"{error.message} (at {error.json_path})"


# --- The deterministic default responder --------------------------------------------------------------

_DOC_TAG = re.compile(r"<(documentation|docs|document|context|chunk)>(.*?)</\1>", re.I | re.S)
_DOC_LABEL = re.compile(
    r"^[ \t]*(?:documentation|docs|document|context|text|passage|chunk|excerpt)\b[^\n:]{0,40}:[ \t]*",
    re.I | re.M,
)
_STOP_LABEL = re.compile(r"^[ \t]*(?:questions?|answer)[ \t]*:", re.I | re.M)
_QUESTION_LABEL = re.compile(r"^[ \t]*question[ \t]*:[ \t]*(.*)$", re.I | re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_WORD = re.compile(r"[A-Za-z0-9_][\w.-]*")
_QUESTION_TEMPLATES = (
    "What does the documentation say about {}?",
    "What details are given about {}?",
    "What should a user know about {}?",
)
_FALLBACK_TOPICS = ("this section", "these settings", "this part of the docs")


def _message_text(message: dict) -> str:
    """The text of one chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _last_user_text(body: dict) -> str:
    """The text of the last user message in a request body."""
    users = [m for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return _message_text(users[-1]) if users else ""


def _documentation(prompt: str) -> str:
    """The documentation in a prompt: a tagged or labelled block, else the text before the first label."""
    tagged = _DOC_TAG.search(prompt)
    if tagged:
        return tagged.group(2).strip()
    label = _DOC_LABEL.search(prompt)
    start = label.end() if label else 0
    stop = _STOP_LABEL.search(prompt, start)
    return prompt[start : stop.start() if stop else len(prompt)].strip()


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of a Markdown text, each on one line: no headings, code blocks or table rules."""
    lines: list[str] = []
    in_code = False
    for line in [*doc.splitlines(), ""]:
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
        is_break = in_code or not line.strip() or _HEADING.match(line) or re.fullmatch(r"[\s|:-]*", line)
        # A list item or table row starts a paragraph of its own.
        if lines and (is_break or re.match(r"\s*(?:[-*+>]|\d+[.)]|\|)\s", line)):
            yield " ".join(lines)
            lines = []
        if not is_break and not line.lstrip().startswith(("```", "~~~")):
            lines.append(re.sub(r"^\s*(?:[-*+>]|\d+[.)])\s+", "", line).strip(" |"))


def _sentences(doc: str) -> list[str]:
    """Prose sentences of a Markdown text, of three words or more."""
    sentences = [s for p in _paragraphs(doc) for s in re.split(r"(?<=[.!?])\s+", p)]
    return [s.strip() for s in sentences if len(_WORD.findall(s)) >= 3]


def _first_words(sentence: str) -> str:
    """The start of a sentence: up to its first comma, colon or semicolon, and at most eight words."""
    return " ".join(_WORD.findall(re.split(r"[,:;(]", sentence, maxsplit=1)[0])[:8]).rstrip(".")


def _section_headings(doc: str) -> list[str]:
    """Headings that have text of their own (not bare breadcrumbs like a chunk's leading `# Title`)."""
    lines = [line for line in doc.splitlines() if line.strip()]
    titles: list[str] = []
    for line, following in zip(lines, [*lines[1:], "#"], strict=True):
        heading = _HEADING.match(line)
        if heading and not _HEADING.match(following):
            titles.append(re.sub(r"^\d+[.)]\s+", "", heading.group(1)).strip("`*_ ?"))
    return titles


def _topics(doc: str) -> list[str]:
    """Three distinct topics of a text: its section headings, then the first words of its prose sentences."""
    candidates = _section_headings(doc) + [_first_words(s) for s in _sentences(doc) if "|" not in s]
    topics: list[str] = []
    for topic in [*candidates, *_FALLBACK_TOPICS]:
        if _WORD.search(topic) and topic.lower() not in {t.lower() for t in topics}:
            topics.append(topic)
    return topics[:3]


def _is_question_request(prompt: str) -> bool:
    """True for a prompt asking for questions; a `Question:` label marks an answer prompt instead."""
    if "Questions:" in prompt:
        return True
    return bool(re.search(r"\bquestions\b", prompt, re.I)) and not _QUESTION_LABEL.search(prompt)


def _best_sentence(doc: str, question: str) -> str:
    """The documentation sentence sharing the most words with the question (the first one on ties)."""
    sentences = _sentences(doc) or [line.strip("# ") for line in doc.splitlines() if line.strip()] or ["-"]
    asked = {w for w in _content_words(question) if len(w) > 3}
    return max(sentences, key=lambda s: len(asked & _content_words(s)))


def _content_words(text: str) -> set[str]:
    """Lower-cased words of a text, without trailing full stops."""
    return {w.rstrip(".").lower() for w in _WORD.findall(text)}


def docs_responder(body: dict) -> Reply:
    """Three numbered questions about the documentation in a question prompt, or an answer quoting it."""
    prompt = _last_user_text(body)
    doc = _documentation(prompt)
    if len(_WORD.findall(doc)) < 3:
        doc = "\n\n".join(_message_text(m) for m in body.get("messages", []) if isinstance(m, dict))
    if _is_question_request(prompt):
        lines = [
            f"{i}. {t.format(topic)}"
            for i, (t, topic) in enumerate(zip(_QUESTION_TEMPLATES, _topics(doc), strict=True), 1)
        ]
        return Reply(content="\n".join(lines))
    question = _QUESTION_LABEL.search(prompt)
    sentence = _best_sentence(doc, question.group(1) if question else "").rstrip(".!?:;,")
    return Reply(content=f'The documentation says: "{sentence}."')


# --- The HTTP server ---------------------------------------------------------------------------------

# status -> (error type, error code, default message), as the OpenAI API answers them.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to sample from this model."),
    404: ("invalid_request_error", None, "Not found."),
    408: ("timeout", None, "Request timed out."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
}
_SERVER_ERROR = ("server_error", None, "The server had an error while processing your request.")


def error_body(status: int, message: str = "", param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body for an HTTP status."""
    kind, code, default = _ERRORS.get(status, _SERVER_ERROR)
    return {"error": {"message": message or default, "type": kind, "param": param, "code": code}}


def _word_count(text: str) -> int:
    return len(text.split())


def _usage(body: dict, content: str) -> dict[str, int]:
    """Token usage, counted roughly as words."""
    prompt = sum(_word_count(_message_text(m)) for m in body.get("messages", []) if isinstance(m, dict))
    completion = _word_count(content)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is part of the tests, not a server fault.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, keep-alive requests wait ~40 ms each.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.fake._dispatch(self, "GET", b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.fake._dispatch(self, "POST", self.rfile.read(length))

    def do_DELETE(self) -> None:
        self.server.fake._dispatch(self, "DELETE", b"")

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows failures, not access logs."""

    def send_json(self, status: int, payload: object, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_events(self, events: list[dict[str, Any]], headers: dict[str, str]) -> None:
        """Server-sent events in chunked transfer encoding, ending with `data: [DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            data = f"data: {event}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class FakeOpenAI:
    """An OpenAI-compatible chat completions server on a free 127.0.0.1 port, for use as a context manager."""

    def __init__(self, responder: Responder | None = None, api_key: str | None = None) -> None:
        self.responder: Responder = responder or docs_responder
        self.api_key = api_key
        self.requests: list[dict] = []
        self.invalid_requests: list[InvalidRequest] = []
        self.responder_errors: list[Exception] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI `base_url` of the running server."""
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not running; use it as `with FakeOpenAI() as fake:`")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def queue(self, *replies: Reply) -> None:
        """Serve these replies first, in order, before falling back to the responder."""
        with self._lock:
            self._replies.extend(replies)

    def __enter__(self) -> FakeOpenAI:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        # A short poll interval keeps `shutdown()` (and so each test's teardown) fast.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()  # wakes handlers sleeping in a Reply's delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def _dispatch(self, handler: _Handler, method: str, raw_body: bytes) -> None:
        path = handler.path.split("?", 1)[0].rstrip("/")
        request_id = {"x-request-id": f"req_fake{next(self._ids):06d}"}
        is_chat = method == "POST" and path == "/v1/chat/completions"
        body, problem = self._receive(raw_body) if is_chat else (None, None)
        if not self._authorized(handler.headers.get("Authorization")):
            missing = not handler.headers.get("Authorization")
            message = "You didn't provide an API key." if missing else "Incorrect API key provided."
            handler.send_json(401, error_body(401, message), request_id)
        elif problem is not None:
            handler.send_json(400, error_body(400, problem), request_id)
        elif is_chat and body is not None:
            self._complete(handler, body, request_id)
        elif method == "GET" and path == "/v1/models":
            handler.send_json(200, self._models(), request_id)
        else:
            handler.send_json(404, error_body(404, f"Invalid URL ({method} {handler.path})"), request_id)

    def _authorized(self, authorization: str | None) -> bool:
        return self.api_key is None or authorization == f"Bearer {self.api_key}"

    def _receive(self, raw_body: bytes) -> tuple[dict | None, str | None]:
        """Record a chat completion body and check it against the spec: (body, why it is invalid or None)."""
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            unparsed = "We could not parse the JSON body of your request: expected a JSON object."
            with self._lock:
                self.invalid_requests.append(InvalidRequest(unparsed, raw_body.decode(errors="replace")))
            return None, unparsed
        problem = spec_violation(body, "CreateChatCompletionRequest")
        with self._lock:
            self.requests.append(body)
            if problem is not None:
                self.invalid_requests.append(InvalidRequest(problem, body))
        return body, problem

    def _next_reply(self, body: dict) -> Reply:
        with self._lock:
            queued = self._replies.popleft() if self._replies else None
        if queued is not None:
            return queued
        try:
            return self.responder(body)
        except Exception as exc:  # recorded and answered 500, so a test sees it rather than a hang
            with self._lock:
                self.responder_errors.append(exc)
            return Reply(status=500, content=f"The fake's responder raised {exc!r}")

    def _complete(self, handler: _Handler, body: dict, request_id: dict[str, str]) -> None:
        reply = self._next_reply(body)
        if reply.delay_s > 0:
            self._stopping.wait(reply.delay_s)
        headers = {**request_id, **reply.headers}
        if reply.status != 200:
            handler.send_json(reply.status, error_body(reply.status, reply.content), headers)
        elif body.get("stream"):
            handler.send_events(self._chunks(body, reply, headers["x-request-id"]), headers)
        else:
            handler.send_json(200, self._completion(body, reply, headers["x-request-id"]), headers)

    def _completion(self, body: dict, reply: Reply, request_id: str) -> dict[str, Any]:
        """A `chat.completion` object as the OpenAI spec shapes it."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.content,
            "refusal": None,
            "annotations": [],
        }
        return {
            "id": request_id.replace("req_", "chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
            ],
            "usage": _usage(body, reply.content),
            "system_fingerprint": "fp_fake",
        }

    def _chunks(self, body: dict, reply: Reply, request_id: str) -> list[dict[str, Any]]:
        """The `chat.completion.chunk` events of a streamed reply, word by word."""
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": request_id.replace("req_", "chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "system_fingerprint": "fp_fake",
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "choices": [choice]}

        pieces = re.findall(r"\s*\S+\s*", reply.content) or ([reply.content] if reply.content else [])
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": piece}) for piece in pieces]
        events.append(chunk({}, reply.finish_reason))
        if include_usage:
            events.append({**base, "choices": [], "usage": _usage(body, reply.content)})
        return events

    @staticmethod
    def _models() -> dict[str, Any]:
        """The `GET /v1/models` list."""
        data = [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-openai"} for m in MODEL_IDS
        ]
        return {"object": "list", "data": data}
