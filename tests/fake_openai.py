"""A fake OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, bodies checked against the spec."""

from __future__ import annotations

import base64
import email.message
import email.policy
import functools
import hashlib
import itertools
import json
import math
import random
import re
import struct
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.loopback import LoopbackServer

SPEC_PATH = Path(__file__).resolve().parent / "fixtures" / "openai-schemas.json"  # make_openai_subset.py
MODEL_IDS = ("gpt-4o-mini", "fake-model")
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


@dataclass(frozen=True)
class Faults:
    """Seeded fault injection: the share of chat completions answered each way instead of by the responder."""

    rate_limited: float = 0.0  # 429 with Retry-After
    server_error: float = 0.0  # 500
    timeout: float = (
        0.0  # the responder's answer, sent after `timeout_s` (set it beyond the client's timeout)
    )
    malformed: float = 0.0  # an empty answer, or prose that holds no list of questions
    seed: int = 0
    retry_after_s: float = 0.05
    timeout_s: float = 2.5

    def pick(self, roll: float) -> str | None:
        """The fault for a uniform `roll` in [0, 1), or None for a normal answer."""
        bound = 0.0
        for kind in ("rate_limited", "server_error", "timeout", "malformed"):
            bound += getattr(self, kind)
            if roll < bound:
                return kind
        return None


MALFORMED_CONTENTS = ("", "Sorry, I cannot help with that.")

Responder = Callable[[dict], Reply]


# --- The OpenAI spec ---------------------------------------------------------------------------------


@functools.cache
def spec_schemas(spec_path: Path = SPEC_PATH) -> dict[str, Any]:
    """The schemas of the OpenAI spec the fake checks against: the subset kept in tests/fixtures."""
    return json.loads(spec_path.read_text(encoding="utf-8"))


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


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_QUOTED_ANSWER = re.compile(r'^The documentation says: "(.*?)"(?=\s|$)', re.S)  # docs_responder's answers


def judge_by_words(doc: str, answer: str) -> str:
    """A grounding judge's reply: a sentence of the answer is supported when the documentation has its words."""
    unquoted = _QUOTED_ANSWER.sub(r"\1", answer.strip())
    claims = [s for s in re.split(r"(?<=[.!?])\s+", unquoted) if s.strip()]
    known = _content_words(doc)
    unsupported = [c for c in claims if {w for w in _content_words(c) if len(w) > 3} - known]
    verdict = "unsupported" if len(unsupported) == len(claims) else "partly" if unsupported else "supported"
    return f"Verdict: {verdict}\nUnsupported claim: {unsupported[0] if unsupported else 'none'}"


def docs_responder(body: dict) -> Reply:
    """Three numbered questions about the documentation in a question prompt, or an answer quoting it."""
    prompt = _last_user_text(body)
    doc = _documentation(prompt)
    if (answer := _ANSWER_TAG.search(prompt)) and "Verdict:" in prompt:  # a grounding judge's prompt
        return Reply(content=judge_by_words(doc, answer.group(1).strip()))
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


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in `x-ratelimit-reset-*`: "120ms", "1s", "6m0s", "1m30.5s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    return (f"{int(minutes)}m" if minutes else "") + f"{rest:g}s"


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


class _Server(LoopbackServer):
    fake: FakeOpenAI


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

    def __init__(
        self,
        responder: Responder | None = None,
        api_key: str | None = None,
        *,
        rpm: int | None = None,
        rpm_burst_s: float = 1.0,
        tpm: int | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.responder: Responder = responder or docs_responder
        self.api_key = api_key
        self.rpm, self.rpm_burst_s = rpm, rpm_burst_s  # a server-side token bucket of requests per minute
        self.tpm = tpm  # a token bucket too, charged prompt + max_tokens on admission as OpenAI does
        self.tokens_charged = 0
        self._tokens, self._tokens_at = math.inf, time.monotonic()
        self.rate_limited = 0  # requests answered 429 because the bucket was empty
        self.faults = faults
        self.faults_injected: Counter[str] = Counter()
        self._rng = random.Random(faults.seed if faults else 0)
        self._bucket, self._bucket_at = math.inf, time.monotonic()
        self.requests: list[dict] = []
        self.batch_api = FakeBatchAPI(self)  # /v1/files and /v1/batches
        self.fine_tuning = FakeFineTuningAPI(self)  # /v1/fine_tuning/jobs
        self.embeddings = FakeEmbeddingsAPI(self)  # /v1/embeddings
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
        elif self.embeddings.handles(method, path):
            self.embeddings.dispatch(handler, raw_body, request_id)
        elif self.batch_api.handles(path):
            self.batch_api.dispatch(handler, method, path, raw_body, request_id)
        elif self.fine_tuning.handles(path):
            self.fine_tuning.dispatch(handler, method, path, raw_body, request_id)
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

    def _take_from_bucket(self, body: dict) -> tuple[bool, dict[str, str]]:
        """Take one request from the rpm bucket and its tokens from the tpm one: (admitted, x-ratelimit headers)."""
        cost = _usage(body, "")["prompt_tokens"] + int(body.get("max_tokens") or 0)
        kinds = [
            (kind, cap, n) for kind, cap, n in (("requests", self.rpm, 1), ("tokens", self.tpm, cost)) if cap
        ]
        headers: dict[str, str] = {}
        with self._lock:
            now = time.monotonic()
            levels = {}
            for kind, cap, _ in kinds:
                per_s, capacity = cap / 60, max(1.0, cap / 60 * self.rpm_burst_s)
                level, at = (
                    (self._bucket, self._bucket_at) if kind == "requests" else (self._tokens, self._tokens_at)
                )
                levels[kind] = (min(capacity, level + (now - at) * per_s), per_s, capacity)
            admitted = all(levels[kind][0] >= min(n, levels[kind][2]) for kind, _, n in kinds)
            for kind, _, n in kinds:
                level, per_s, capacity = levels[kind]
                level -= n if admitted else 0
                levels[kind] = (level, per_s, capacity)
                if kind == "requests":
                    self._bucket, self._bucket_at = level, now
                else:
                    self._tokens, self._tokens_at = level, now
            self.rate_limited += not admitted
            self.tokens_charged += cost if admitted else 0
        wait_s = 0.0
        for kind, cap, n in kinds:
            level, per_s, capacity = levels[kind]
            headers |= {
                f"x-ratelimit-limit-{kind}": str(cap),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(level))),
                f"x-ratelimit-reset-{kind}": openai_duration(max(0.0, capacity - level) / per_s),
            }
            wait_s = max(wait_s, (min(n, capacity) - level) / per_s)
        if not admitted:
            for kind, _, n in kinds:  # OpenAI reports the budget that ran out as spent
                level, _, capacity = levels[kind]
                if level < min(n, capacity):
                    headers[f"x-ratelimit-remaining-{kind}"] = "0"
            headers |= {
                "retry-after": str(math.ceil(wait_s)),
                "retry-after-ms": str(math.ceil(wait_s * 1000)),
            }
        return admitted, headers

    def _injected_fault(self, body: dict) -> Reply | None:
        """A faulty reply, drawn with the seeded probabilities of `faults`, or None."""
        if self.faults is None:
            return None
        with self._lock:
            kind, variant = self.faults.pick(self._rng.random()), self._rng.random()
            if kind:
                self.faults_injected[kind] += 1
        wait_s = self.faults.retry_after_s
        if kind == "rate_limited":
            retry = {"retry-after": str(math.ceil(wait_s)), "retry-after-ms": str(round(wait_s * 1000))}
            return Reply(status=429, headers=retry)
        if kind == "server_error":
            return Reply("injected server error", status=500)
        if kind == "timeout":
            return replace(self._next_reply(body), delay_s=self.faults.timeout_s)
        if kind == "malformed":
            return Reply(MALFORMED_CONTENTS[int(variant * len(MALFORMED_CONTENTS))])
        return None

    def _complete(self, handler: _Handler, body: dict, request_id: dict[str, str]) -> None:
        admitted, limits = self._take_from_bucket(body)
        reply = (self._injected_fault(body) or self._next_reply(body)) if admitted else Reply(status=429)
        if reply.delay_s > 0:
            self._stopping.wait(reply.delay_s)
        headers = {**request_id, **limits, **reply.headers}
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


# --- The Embeddings API ------------------------------------------------------------------------------

EMBEDDING_MODEL_IDS = ("text-embedding-3-small", "fake-embedder")
EMBEDDING_DIM = 64


def bag_of_words_vector(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic embedding: each lower-cased word adds ±1 at a hashed index; L2-normalised."""
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        digest = hashlib.sha256(word.encode()).digest()
        vector[int.from_bytes(digest[:4], "little") % dim] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0:  # no words: a fixed unit vector, so every answer is normalised
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in vector]


class FakeEmbeddingsAPI:
    """The fake's POST /v1/embeddings: bag-of-words vectors (`bag_of_words_vector`), bodies checked against the spec.

    `dim` is the vector size unless a request asks for `dimensions`; `encoding_format` float or base64 (the
    SDK's default); `queue(Reply(status=…))` answers the next requests with errors instead; `inputs` holds the
    inputs of every valid request, in order, and `calls` counts the requests answered with vectors.
    """

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.dim = EMBEDDING_DIM
        self.models: tuple[str, ...] = EMBEDDING_MODEL_IDS
        self.calls = 0
        self.inputs: list[list[str]] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()

    @staticmethod
    def handles(method: str, path: str) -> bool:
        """True for the path this API serves."""
        return method == "POST" and path == "/v1/embeddings"

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with these errors: each reply's status, headers and content as the message."""
        with self._lock:
            self._replies.extend(replies)

    def dispatch(self, handler: _Handler, raw_body: bytes, headers: dict[str, str]) -> None:
        """Answer one embeddings request."""
        with self._lock:
            queued = self._replies.popleft() if self._replies else None
        if queued is not None:
            handler.send_json(
                queued.status, error_body(queued.status, queued.content), headers | queued.headers
            )
            return
        status, payload = self._answer(raw_body)
        handler.send_json(status, payload, headers)

    def _answer(self, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        body, problem = self._receive(raw_body)
        if problem is not None or body is None:
            return 400, error_body(400, problem or "", "input")
        if body["model"] not in self.models:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            return 404, {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            }
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        with self._lock:
            self.calls += 1
            self.inputs.append(list(inputs))
        return 200, self._response(body, inputs)

    def _receive(self, raw_body: bytes) -> tuple[dict | None, str | None]:
        """The body and why the API would refuse it: off the spec, token ids (not kept here), or an empty string."""
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
        problem = (
            spec_violation(body, "CreateEmbeddingRequest")
            if isinstance(body, dict)
            else "expected a JSON object"
        )
        if problem is None and isinstance(body, dict):
            inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
            if not all(isinstance(item, str) for item in inputs):
                problem = "the fake embeds strings only, not token ids"
            elif "" in inputs:
                problem = "'$.input' is invalid: an input cannot be an empty string."
        if problem is not None:
            with self.fake._lock:
                self.fake.invalid_requests.append(InvalidRequest(problem, body))
        return (body if problem is None else None), problem

    def _response(self, body: dict, inputs: list[str]) -> dict[str, Any]:
        """The spec's CreateEmbeddingResponse."""
        dim = body.get("dimensions") or self.dim
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = bag_of_words_vector(text, dim)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(_word_count(text) for text in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "model": body["model"], "data": data, "usage": usage}


# --- The Files and Batch APIs ------------------------------------------------------------------------

_BATCH_STEPS = ("validating", "in_progress", "finalizing", "completed")
_BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
_FILE_PATH = re.compile(r"/v1/files/([^/]+)(/content)?")
_BATCH_PATH = re.compile(r"/v1/batches/([^/]+)(/cancel)?")
_EXPIRED_LINE = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


@dataclass
class LineFailure:
    """How the fake answers one batch line instead of asking the responder, chosen by its custom_id."""

    status: int | None = 500  # None: the line gets no result at all
    in_error_file: bool = False  # listed in the error file (as the live API does), not in the output file
    times: int | None = None  # fail this many batches, then answer normally; None: every time


@dataclass
class FakeFile:
    """One uploaded or generated file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_object(self) -> dict[str, Any]:
        """The spec's OpenAIFile object."""
        expires = {"expires_at": self.created_at + 30 * 86400} if self.purpose == "batch" else {}
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            **expires,
        }


@dataclass
class FakeBatch:
    """One batch: its request, its parsed input lines and where it stands."""

    id: str
    request: dict[str, Any]
    lines: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    created_at: int
    started: float
    status: str = "validating"
    polls: int = 0
    times: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file_id: str | None = None
    error_file_id: str | None = None

    def as_object(self) -> dict[str, Any]:
        """The spec's Batch object (fields without a value are left out, as the spec types them non-null)."""
        batch: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.request["endpoint"],
            "model": self.lines[0]["body"].get("model") if self.lines and not self.errors else None,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.request["input_file_id"],
            "completion_window": self.request["completion_window"],
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86400,
            **self.times,
            "request_counts": self.counts,
        }
        return {k: v for k, v in batch.items() if v is not None} | {"metadata": self.request.get("metadata")}


class FakeBatchAPI:
    """The fake's /v1/files and /v1/batches: a batch advances one status every `polls_per_step` retrieves.

    validating → in_progress → finalizing → completed; lines are answered by the fake's responder when the
    batch finalizes. Set `seconds_per_step` to advance with time instead, `line_failures` to fail chosen
    custom_ids, and `expire_after_lines` to make batches expire with only that many lines answered.
    """

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.calls: list[str] = []  # "METHOD /path" of every files and batches request, in order
        self.polls_per_step = 1
        self.seconds_per_step: float | None = None
        self.line_failures: dict[str, LineFailure] = {}
        self.expire_after_lines: int | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @staticmethod
    def handles(path: str) -> bool:
        """True for the paths this API serves."""
        return path == "/v1/files" or path.startswith(("/v1/files/", "/v1/batches"))

    def dispatch(
        self, handler: _Handler, method: str, path: str, raw_body: bytes, headers: dict[str, str]
    ) -> None:
        """Answer one files or batches request."""
        with self._lock:
            self.calls.append(f"{method} {path}")
            status, payload = self._route(handler, method, path, raw_body)
        if isinstance(payload, bytes):
            _send_file(handler, payload, headers)
        else:
            handler.send_json(status, payload, headers)

    def _route(self, handler: _Handler, method: str, path: str, raw_body: bytes) -> tuple[int, Any]:
        file_path, batch_path = _FILE_PATH.fullmatch(path), _BATCH_PATH.fullmatch(path)
        if method == "POST" and path == "/v1/files":
            return self._upload(handler.headers.get("Content-Type", ""), raw_body)
        if method == "GET" and file_path and file_path.group(1) in self.files:
            stored = self.files[file_path.group(1)]
            return 200, stored.data if file_path.group(2) else stored.as_object()
        if method == "POST" and path == "/v1/batches":
            return self._create(raw_body)
        if method == "GET" and path == "/v1/batches":
            return self._list(handler.path)
        if batch_path and batch_path.group(1) in self.batches:
            batch = self.batches[batch_path.group(1)]
            if method == "GET" and not batch_path.group(2):
                batch.polls += 1
                self._advance(batch)
                return 200, batch.as_object()
            if method == "POST" and batch_path.group(2):
                return self._cancel(batch)
        if file_path or batch_path:
            return 404, error_body(404, f"No such object: {path.rsplit('/', 1)[-1]}")
        return 404, error_body(404, f"Invalid URL ({method} {path})")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    def _store_file(self, filename: str, purpose: str, data: bytes) -> FakeFile:
        stored = FakeFile(self._new_id("file-fake"), filename, purpose, data, int(time.time()))
        self.files[stored.id] = stored
        return stored

    def _upload(self, content_type: str, raw_body: bytes) -> tuple[int, Any]:
        """POST /v1/files: a multipart form with `file` and `purpose`."""
        form = _form_fields(content_type, raw_body)
        if "file" not in form:
            return 400, error_body(400, "Missing required parameter: 'file'.", "file")
        fields = {name: value if name == "file" else value.decode() for name, (_, value) in form.items()}
        problem = spec_violation(fields | {"file": form["file"][0] or "upload"}, "CreateFileRequest")
        if problem is not None:
            return 400, error_body(400, problem)
        stored = self._store_file(form["file"][0] or "upload", str(fields["purpose"]), form["file"][1])
        return 200, stored.as_object()

    def _create(self, raw_body: bytes) -> tuple[int, Any]:
        """POST /v1/batches: check the request and the input file; invalid lines fail the batch later."""
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
        problem = (
            spec_violation(body, "CreateBatchRequest") if isinstance(body, dict) else "expected a JSON object"
        )
        if problem is not None or not isinstance(body, dict):
            return 400, error_body(400, problem or "")
        source = self.files.get(body["input_file_id"])
        if source is None or source.purpose != "batch":
            message = (
                f"Invalid 'input_file_id': '{body['input_file_id']}' is not a file with purpose 'batch'."
            )
            return 400, error_body(400, message, "input_file_id")
        if body["endpoint"] != "/v1/chat/completions":
            return 400, error_body(400, "The fake runs /v1/chat/completions batches only.", "endpoint")
        lines, errors = self._parse_lines(source.data, body["endpoint"])
        now = int(time.time())
        batch = FakeBatch(self._new_id("batch_fake"), body, lines, errors, now, time.monotonic())
        batch.counts["total"] = len(lines)
        self.batches[batch.id] = batch
        return 200, batch.as_object()

    def _parse_lines(self, data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The input file's request lines, and a BatchError for each invalid one (bodies checked by the spec)."""
        lines: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, text in enumerate(data.decode(errors="replace").splitlines(), 1):
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            problem = _line_problem(line, endpoint, seen)
            if problem is None and isinstance(line, dict):
                problem = spec_violation(line["body"], "CreateChatCompletionRequest")
                with self.fake._lock:
                    if problem is not None:
                        self.fake.invalid_requests.append(InvalidRequest(problem, line["body"]))
            if problem is not None:
                errors.append({"code": "invalid_request", "message": problem, "param": None, "line": number})
            elif isinstance(line, dict):
                seen.add(line["custom_id"])
                lines.append(line)
        if not lines and not errors:
            errors.append(
                {"code": "empty_file", "message": "The input file is empty.", "param": None, "line": None}
            )
        return lines, errors

    def _list(self, raw_path: str) -> tuple[int, Any]:
        """GET /v1/batches: newest first, paged with `after` and `limit` (1 to 100, default 20)."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(raw_path).query)
        limit = int(query.get("limit", ["20"])[0])
        if not 1 <= limit <= 100:
            return 400, error_body(400, "Invalid 'limit': must be between 1 and 100.", "limit")
        newest_first = list(reversed(self.batches.values()))
        after = query.get("after", [None])[0]
        ids = [batch.id for batch in newest_first]
        start = ids.index(after) + 1 if after in ids else 0
        page = [batch.as_object() for batch in newest_first[start : start + limit]]
        ends = {"first_id": page[0]["id"], "last_id": page[-1]["id"]} if page else {}
        return 200, {"object": "list", "data": page, **ends, "has_more": start + limit < len(ids)}

    def _cancel(self, batch: FakeBatch) -> tuple[int, Any]:
        """POST /v1/batches/{id}/cancel: `cancelling` now, `cancelled` at the next retrieve."""
        if batch.status not in ("validating", "in_progress"):
            return 400, error_body(400, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.status = "cancelling"
        batch.times["cancelling_at"] = int(time.time())
        return 200, batch.as_object()

    def _step(self, batch: FakeBatch) -> int:
        """How many statuses past `validating` the batch should be by now."""
        if self.seconds_per_step is None:
            return batch.polls // max(1, self.polls_per_step)
        if self.seconds_per_step <= 0:
            return len(_BATCH_STEPS)
        return int((time.monotonic() - batch.started) / self.seconds_per_step)

    def _advance(self, batch: FakeBatch) -> None:
        """Move a batch on to where its polls (or its age) put it, one status at a time."""
        if batch.status == "cancelling":
            self._finish(batch, "cancelled", [], [])
        while batch.status not in _BATCH_TERMINAL and batch.status != "cancelling":
            index = _BATCH_STEPS.index(batch.status)
            if index >= min(self._step(batch), len(_BATCH_STEPS) - 1):
                return
            now = int(time.time())
            if batch.errors:
                batch.status, batch.times["failed_at"] = "failed", now
            elif index == 0:
                batch.status, batch.times["in_progress_at"] = "in_progress", now
            elif index == 1 and self.expire_after_lines is not None:
                answered, unanswered = self._answer(batch.lines[: self.expire_after_lines])
                expired = [
                    _result_line(self._new_id("batch_req_"), line["custom_id"], None, _EXPIRED_LINE)
                    for line in batch.lines[self.expire_after_lines :]
                ]
                self._finish(batch, "expired", answered, unanswered + expired)
            elif index == 1:
                batch.status, batch.times["finalizing_at"] = "finalizing", now
            else:
                self._finish(batch, "completed", *self._answer(batch.lines))

    def _answer(self, lines: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Run the lines through the responder (or their configured failure): (output lines, error lines)."""
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in lines:
            failure = self._failure_for(line["custom_id"])
            if failure is None:
                reply = self.fake._next_reply(line["body"])
            elif failure.status is None:
                continue
            else:
                reply = Reply("Injected batch line failure.", status=failure.status)
            request_id = self._new_id("req_batch")
            body = (
                self.fake._completion(line["body"], reply, request_id)
                if reply.status == 200
                else error_body(reply.status, reply.content)
            )
            response = {"status_code": reply.status, "request_id": request_id, "body": body}
            result = _result_line(self._new_id("batch_req_"), line["custom_id"], response, None)
            # The live API lists failed requests in the error file; a LineFailure may put them in the output.
            in_error_file = failure.in_error_file if failure else reply.status != 200
            (errors if in_error_file else output).append(result)
        return output, errors

    def _failure_for(self, custom_id: str) -> LineFailure | None:
        """The failure configured for a line this time, counting down its `times`."""
        failure = self.line_failures.get(custom_id)
        if failure is None or failure.times is None:
            return failure
        failure.times -= 1
        return failure if failure.times >= 0 else None

    def _finish(
        self, batch: FakeBatch, status: str, output: list[dict[str, Any]], errors: list[dict[str, Any]]
    ) -> None:
        """Write the result files and end the batch in a terminal status."""
        if output:
            batch.output_file_id = self._store_file(
                f"{batch.id}_output.jsonl", "batch_output", _jsonl(output)
            ).id
        if errors:
            batch.error_file_id = self._store_file(
                f"{batch.id}_error.jsonl", "batch_output", _jsonl(errors)
            ).id
        answered = sum(1 for line in output if (line["response"] or {}).get("status_code") == 200)
        batch.counts = {
            "total": len(batch.lines),
            "completed": answered,
            "failed": len(output) + len(errors) - answered,
        }
        batch.status = status
        batch.times[f"{status}_at"] = int(time.time())


def _line_problem(line: object, endpoint: str, seen: set[str]) -> str | None:
    """Why one input line is not a request line for this batch (its body is checked separately)."""
    if not isinstance(line, dict):
        return "The line is not a JSON object."
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "Missing 'custom_id'."
    if custom_id in seen:
        return f"The custom_id '{custom_id}' appears more than once."
    if line.get("method") != "POST":
        return "The 'method' must be 'POST'."
    if line.get("url") != endpoint:
        return f"The 'url' must be the batch's endpoint '{endpoint}'."
    if not isinstance(line.get("body"), dict):
        return "Missing 'body'."
    return None


def _result_line(line_id: str, custom_id: str, response: dict | None, error: dict | None) -> dict[str, Any]:
    """One line of a batch's output or error file."""
    return {"id": line_id, "custom_id": custom_id, "response": response, "error": error}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _form_fields(content_type: str, raw_body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, value)."""
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw_body, policy=email.policy.HTTP
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts() if isinstance(message, email.message.EmailMessage) else []:
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _send_file(handler: _Handler, data: bytes, headers: dict[str, str]) -> None:
    """A file's raw content, as GET /v1/files/{id}/content answers it."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


# --- The fine-tuning API -----------------------------------------------------------------------------

_FT_PATH = re.compile(r"/v1/fine_tuning/jobs(?:/([^/]+)(?:/(events|checkpoints|cancel))?)?")
_FT_TERMINAL = ("succeeded", "failed", "cancelled")
_FT_DENIED = "This organization does not have access to fine-tuning."


@dataclass
class FakeFineTuningJob:
    """One fine-tuning job: its request, where it stands and its log (oldest first)."""

    id: str
    request: dict[str, Any]
    created_at: int
    status: str = "validating_files"
    step: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    trained_tokens: int | None = None

    def as_object(self) -> dict[str, Any]:
        """The spec's FineTuningJob object."""
        method = self.request.get("method") or {"type": "supervised", "supervised": {}}
        hyper = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
        hyper |= (method.get("supervised") or {}).get("hyperparameters") or {}
        return {
            "object": "fine_tuning.job",
            "id": self.id,
            "model": self.request["model"],
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": "org-fake",
            "result_files": [],
            "status": self.status,
            "validation_file": self.request.get("validation_file"),
            "training_file": self.request["training_file"],
            "hyperparameters": hyper,
            "method": {"type": method["type"], "supervised": {"hyperparameters": hyper}},
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.request.get("seed") if self.request.get("seed") is not None else 42,
            "estimated_finish": self.estimated_finish,
            "metadata": self.request.get("metadata"),
        }


class FakeFineTuningAPI:
    """The fake's /v1/fine_tuning/jobs: a job advances one state (or one training step) per retrieve.

    validating_files → queued → running (`total_steps` steps, one metrics event each) → succeeded. Set
    `fail_at_step` to fail the job there, `hold_at_step` to keep it running there until cleared, `deny_create`
    to answer job creation 403 (OpenAI's closure of self-serve fine-tuning), `events_page_cap` to page events
    in smaller pages than asked. Files come from the batch API's /v1/files store.
    """

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.jobs: dict[str, FakeFineTuningJob] = {}
        self.calls: list[str] = []  # "METHOD /path" of every fine-tuning request, in order
        self.total_steps = 4
        self.fail_at_step: int | None = None
        self.failure = {"code": "invalid_training_file", "message": "Training file has 3 invalid examples."}
        self.hold_at_step: int | None = None
        self.deny_create = False
        self.events_page_cap: int | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @staticmethod
    def handles(path: str) -> bool:
        """True for the paths this API serves."""
        return path.startswith("/v1/fine_tuning/jobs")

    def created_jobs(self) -> int:
        """How many jobs were created."""
        return sum(1 for call in self.calls if call == "POST /v1/fine_tuning/jobs")

    def dispatch(
        self, handler: _Handler, method: str, path: str, raw_body: bytes, headers: dict[str, str]
    ) -> None:
        """Answer one fine-tuning request."""
        with self._lock:
            self.calls.append(f"{method} {path}")
            status, payload = self._route(method, path, handler.path, raw_body)
        handler.send_json(status, payload, headers)

    def _route(self, method: str, path: str, raw_path: str, raw_body: bytes) -> tuple[int, Any]:
        match = _FT_PATH.fullmatch(path)
        if match is None:
            return 404, error_body(404, f"Invalid URL ({method} {path})")
        job_id, action = match.groups()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(raw_path).query)
        if job_id is None:
            if method == "POST":
                return self._create(raw_body)
            return self._list_jobs(query) if method == "GET" else (404, error_body(404))
        job = self.jobs.get(job_id)
        if job is None:
            return 404, error_body(404, f"Could not find fine-tune: {job_id}", "fine_tune_id")
        if method == "GET" and action is None:
            self._advance(job)
            return 200, job.as_object()
        if method == "GET" and action == "events":
            return self._page(list(reversed(job.events)), query, self.events_page_cap)
        if method == "GET" and action == "checkpoints":
            return self._page(list(reversed(job.checkpoints)), query, None)
        if method == "POST" and action == "cancel":
            return self._cancel(job)
        return 404, error_body(404, f"Invalid URL ({method} {path})")

    def _create(self, raw_body: bytes) -> tuple[int, Any]:
        """POST /v1/fine_tuning/jobs: the body is checked against the spec, the files against the store."""
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
        problem = (
            spec_violation(body, "CreateFineTuningJobRequest")
            if isinstance(body, dict)
            else "expected a JSON object"
        )
        if problem is not None or not isinstance(body, dict):
            with self.fake._lock:
                self.fake.invalid_requests.append(InvalidRequest(problem or "", body))
            return 400, error_body(400, problem or "")
        if self.deny_create:
            return 403, error_body(403, _FT_DENIED)
        for param in ("training_file", "validation_file"):
            file_id = body.get(param)
            stored = self.fake.batch_api.files.get(file_id) if file_id else None
            if file_id and (stored is None or stored.purpose != "fine-tune"):
                return 400, error_body(
                    400, f"Invalid file '{file_id}': not a file with purpose 'fine-tune'.", param
                )
        job = FakeFineTuningJob(f"ftjob-fake{next(self._ids):06d}", body, int(time.time()))
        self.jobs[job.id] = job
        self._log(job, f"Created fine-tuning job: {job.id}")
        self._log(job, f"Validating training file: {body['training_file']}")
        return 200, job.as_object()

    def _list_jobs(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        """GET /v1/fine_tuning/jobs, newest first, filtered by `metadata[key]=value`."""
        wanted = {key[9:-1]: values[0] for key, values in query.items() if key.startswith("metadata[")}
        jobs = [
            job
            for job in reversed(self.jobs.values())
            if all((job.request.get("metadata") or {}).get(k) == v for k, v in wanted.items())
        ]
        return self._page([job.as_object() for job in jobs], query, None)

    @staticmethod
    def _page(
        newest_first: list[dict[str, Any]], query: dict[str, list[str]], cap: int | None
    ) -> tuple[int, Any]:
        """A cursor page: the items after the id `after`, at most `limit` (default 20)."""
        limit = int(query.get("limit", ["20"])[0])
        limit = min(limit, cap) if cap else limit
        ids = [item["id"] for item in newest_first]
        after = query.get("after", [None])[0]
        start = ids.index(after) + 1 if after in ids else 0
        page = newest_first[start : start + limit]
        ends = (
            {"first_id": page[0]["id"], "last_id": page[-1]["id"]}
            if page
            else {"first_id": None, "last_id": None}
        )
        return 200, {"object": "list", "data": page, "has_more": start + limit < len(ids), **ends}

    def _cancel(self, job: FakeFineTuningJob) -> tuple[int, Any]:
        """POST /v1/fine_tuning/jobs/{id}/cancel: cancelled at once, unless already finished."""
        if job.status in _FT_TERMINAL:
            return 400, error_body(400, f"Job has already completed: {job.id}")
        job.status, job.finished_at = "cancelled", int(time.time())
        self._log(job, "Fine-tuning job cancelled")
        return 200, job.as_object()

    def _advance(self, job: FakeFineTuningJob) -> None:
        """One state further, or one training step further while running."""
        if job.status == "validating_files":
            job.status = "queued"
            self._log(job, "Files validated, moving job to queued state")
        elif job.status == "queued":
            job.status, job.estimated_finish = "running", int(time.time()) + 600
            self._log(job, "Fine-tuning job started")
        elif job.status == "running" and job.step == self.fail_at_step:
            job.status, job.finished_at = "failed", int(time.time())
            job.error = {"code": self.failure["code"], "message": self.failure["message"], "param": None}
            self._log(job, f"Fine-tuning job failed: {self.failure['message']}", level="error")
        elif job.status == "running" and job.step < self.total_steps:
            if self.hold_at_step is None or job.step < self.hold_at_step:
                self._train_step(job)
        elif job.status == "running":
            self._succeed(job)

    def _train_step(self, job: FakeFineTuningJob) -> None:
        job.step += 1
        train_loss, valid_loss = round(2.0 / job.step, 4), round(2.2 / job.step, 4)
        data = {
            "step": job.step,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "total_steps": self.total_steps,
            "train_mean_token_accuracy": round(1 - train_loss / 3, 4),
        }
        message = (
            f"Step {job.step}/{self.total_steps}: training loss={train_loss}, validation loss={valid_loss}"
        )
        self._log(job, message, data=data)
        if job.step >= self.total_steps - 1:
            self._checkpoint(job, data)

    def _succeed(self, job: FakeFineTuningJob) -> None:
        suffix = job.request.get("suffix") or ""
        job.fine_tuned_model = f"ft:{job.request['model']}:fake-org:{suffix}:{job.id[-6:]}"
        job.status, job.finished_at, job.trained_tokens = (
            "succeeded",
            int(time.time()),
            1000 * self.total_steps,
        )
        self._log(job, f"New fine-tuned model created: {job.fine_tuned_model}")
        self._log(job, "The job has successfully completed")

    def _checkpoint(self, job: FakeFineTuningJob, data: dict[str, Any]) -> None:
        model = f"ft:{job.request['model']}:fake-org::{job.id[-6:]}:ckpt-step-{job.step}"
        job.checkpoints.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-fake{next(self._ids):06d}",
                "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": model,
                "fine_tuning_job_id": job.id,
                "step_number": job.step,
                "metrics": {
                    "step": data["step"],
                    "train_loss": data["train_loss"],
                    "valid_loss": data["valid_loss"],
                },
            }
        )

    def _log(
        self, job: FakeFineTuningJob, message: str, *, level: str = "info", data: dict | None = None
    ) -> None:
        event: dict[str, Any] = {
            "object": "fine_tuning.job.event",
            "id": f"ftevent-fake{next(self._ids):06d}",
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "type": "metrics" if data else "message",
        }
        job.events.append(event | ({"data": data} if data else {}))
