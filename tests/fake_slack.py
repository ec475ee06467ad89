"""A fake Slack for tests: the Web API on 127.0.0.1 recording every call, and Slack's side of the Events API.

The Web API keeps channels' messages, so the bot's placeholders, updates and thread history behave as in Slack:
auth.test, chat.postMessage, chat.update, conversations.replies, reactions.add/remove/get, apps.connections.open.
`post_event` delivers an Events API payload to the bot over HTTP, signed as Slack signs it (v0 HMAC-SHA256).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.loopback import LoopbackServer

BOT_TOKEN = "xoxb-test-0123456789"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_USER = "UBOTUSER1"
BOT_ID = "BBOTID001"
TEAM = "TFAKETEAM"
ALICE = "UALICE001"
BOB = "UBOB00001"
OTHER_BOT_ID = "BOTHERBOT"


@dataclass(frozen=True)
class SlackCall:
    """One Web API call: the method, its arguments (query, form or JSON), and when it arrived."""

    method: str
    args: dict[str, Any]
    at: float


class FakeSlack:
    """A Slack workspace's Web API on a free 127.0.0.1 port, for use as a context manager."""

    def __init__(self, token: str = BOT_TOKEN, app_token: str | None = None) -> None:
        self.token, self.app_token = token, app_token
        self.calls: list[SlackCall] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}  # channel -> every message, replies included
        self.errors: dict[str, str] = {}  # method -> the error Slack answers it with, e.g. "missing_scope"
        self.socket_url: str | None = None  # what apps.connections.open hands out
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._events = itertools.count(1)
        self._server: LoopbackServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The Web API base URL (what SLACK_API_URL is set to)."""
        assert self._server is not None, "use FakeSlack as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/api/"

    def __enter__(self) -> FakeSlack:
        self._server = LoopbackServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        self._server.server_bind()
        self._server.server_activate()
        self._server.fake = self  # type: ignore[attr-defined]
        serve = functools.partial(self._server.serve_forever, poll_interval=0.02)
        self._thread = threading.Thread(target=serve, name="fake-slack", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    # --- what tests read --------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[SlackCall]:
        """The calls made to one method, in order."""
        with self._lock:
            return [call for call in self.calls if call.method == method]

    def message(self, channel: str, ts: str) -> dict[str, Any]:
        """One message as it stands now."""
        with self._lock:
            return next(m for m in self.messages.get(channel, []) if m["ts"] == ts)

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """A thread's messages (its parent first), oldest first."""
        with self._lock:
            found = [m for m in self.messages.get(channel, []) if thread_ts in (m["ts"], m.get("thread_ts"))]
        return sorted(found, key=lambda m: Decimal(m["ts"]))

    def bot_messages(self, channel: str) -> list[dict[str, Any]]:
        """The bot's messages in a channel, oldest first."""
        with self._lock:
            return [m for m in self.messages.get(channel, []) if m.get("bot_id") == BOT_ID]

    # --- what people and other bots do -------------------------------------------------------------

    def next_ts(self) -> str:
        """A fresh, increasing message timestamp."""
        return f"1700000000.{next(self._ts):06d}"

    def user_says(
        self,
        channel: str,
        text: str,
        *,
        user: str = ALICE,
        thread_ts: str | None = None,
        channel_type: str = "channel",
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add a person's message to the channel and return its `message` event."""
        ts = self.next_ts()
        message = {"type": "message", "user": user, "text": text, "ts": ts, **(extra or {})}
        if thread_ts:
            message["thread_ts"] = thread_ts
        with self._lock:
            self.messages.setdefault(channel, []).append(message)
        return {**message, "channel": channel, "channel_type": channel_type, "event_ts": ts, "team": TEAM}

    def envelope(self, event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        """An Events API `event_callback` payload around one event."""
        return {
            "token": "legacy-verification-token",
            "team_id": TEAM,
            "api_app_id": "AFAKEAPP1",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._events):08d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}],
        }

    # --- the Web API --------------------------------------------------------------------------------

    def _call(self, method: str, token: str | None, args: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append(SlackCall(method, args, time.monotonic()))
            expected = self.app_token if method == "apps.connections.open" else self.token
            if token != expected:
                return {"ok": False, "error": "invalid_auth"}
            if method in self.errors:
                return {"ok": False, "error": self.errors[method]}
            handler = getattr(self, "_" + method.replace(".", "_"), None)
            return handler(args) if handler else {"ok": False, "error": "unknown_method"}

    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://fake.slack.test/",
            "team": "Fake Team",
            "user": "ftkit",
            "team_id": TEAM,
            "user_id": BOT_USER,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, text = args.get("channel"), args.get("text") or ""
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not text:
            return {"ok": False, "error": "no_text"}
        if len(text) > 40_000:
            return {"ok": False, "error": "msg_too_long"}
        ts = self.next_ts()
        message = {
            "type": "message",
            "user": BOT_USER,
            "bot_id": BOT_ID,
            "app_id": "AFAKEAPP1",
            "text": text,
            "ts": ts,
        }
        if args.get("thread_ts"):
            message["thread_ts"] = args["thread_ts"]
        self.messages.setdefault(channel, []).append(message)
        return {"ok": True, "channel": channel, "ts": ts, "message": dict(message)}

    def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts, text = args.get("channel"), args.get("ts"), args.get("text") or ""
        found = [m for m in self.messages.get(str(channel), []) if m["ts"] == ts]
        if not found:
            return {"ok": False, "error": "message_not_found"}
        if found[0].get("bot_id") != BOT_ID:
            return {"ok": False, "error": "cant_update_message"}
        if len(text) > 40_000:
            return {"ok": False, "error": "msg_too_long"}
        found[0].update(text=text, edited={"user": BOT_USER, "ts": self.next_ts()})
        return {"ok": True, "channel": channel, "ts": ts, "text": text}

    def _conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(args.get("channel")), str(args.get("ts"))
        found = [m for m in self.messages.get(channel, []) if ts in (m["ts"], m.get("thread_ts"))]
        if not found:
            return {"ok": False, "error": "thread_not_found"}
        found.sort(key=lambda m: Decimal(m["ts"]))
        start, limit = int(args.get("cursor") or 0), int(args.get("limit") or 1000)
        page = [dict(m) for m in found[start : start + limit]]
        more = start + limit < len(found)
        return {
            "ok": True,
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _reactions_add(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._find(args)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message.setdefault("reactions", []).append(
            {"name": args.get("name"), "users": [BOT_USER], "count": 1}
        )
        return {"ok": True}

    def _reactions_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._find(args)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message["reactions"] = [r for r in message.get("reactions", []) if r["name"] != args.get("name")]
        return {"ok": True}

    def _reactions_get(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._find(args)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        return {"ok": True, "type": "message", "channel": args.get("channel"), "message": dict(message)}

    def _apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.socket_url is None:
            return {"ok": False, "error": "not_allowed_token_type"}
        return {"ok": True, "url": self.socket_url}

    def _find(self, args: dict[str, Any]) -> dict[str, Any] | None:
        channel, ts = str(args.get("channel")), args.get("timestamp")
        return next((m for m in self.messages.get(channel, []) if m["ts"] == ts), None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _answer(self, raw: bytes) -> None:
        path, _, query = self.path.partition("?")
        args: dict[str, Any] = dict(urllib.parse.parse_qsl(query))
        if raw and "json" in (self.headers.get("Content-Type") or ""):
            args.update(json.loads(raw))
        elif raw:
            args.update(urllib.parse.parse_qsl(raw.decode()))
        auth = self.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.pop("token", None)
        fake: FakeSlack = self.server.fake  # type: ignore[attr-defined]
        data = json.dumps(fake._call(path.removeprefix("/api/"), token, args)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: failures show in assertions, not access logs."""


# --- Slack's side of the Events API ---------------------------------------------------------------


def sign(secret: str, timestamp: str, body: str) -> str:
    """Slack's v0 request signature: HMAC-SHA256 of `v0:{timestamp}:{body}` with the signing secret."""
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return "v0=" + digest


def post_event(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str | None = SIGNING_SECRET,
    timestamp: float | None = None,
    retry_num: int | None = None,
    body: str | None = None,
) -> tuple[int, str, float]:
    """POST a payload to the bot as Slack does: (status, response body, seconds until the response)."""
    body = body if body is not None else json.dumps(payload)
    stamp = str(int(timestamp if timestamp is not None else time.time()))
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers |= {
            "X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": sign(secret, stamp, json.dumps(payload)),
        }
    if retry_num is not None:
        headers |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), time.perf_counter() - started


# --- Socket Mode ----------------------------------------------------------------------------------------

_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeSocketMode:
    """Slack's Socket Mode endpoint: a websocket on 127.0.0.1 that pushes event envelopes and records acks."""

    def __init__(self) -> None:
        self.acks: list[str] = []  # envelope ids the app acknowledged, in order
        self.connected = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._client: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._acked = threading.Condition()
        self._ids = itertools.count(1)

    @property
    def url(self) -> str:
        """What apps.connections.open hands out."""
        return f"ws://127.0.0.1:{self._listener.getsockname()[1]}/link/?ticket=fake"

    def __enter__(self) -> FakeSocketMode:
        threading.Thread(target=self._serve, name="fake-socket-mode", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        if self._client is not None:
            self._client.close()

    def push(self, payload: dict[str, Any], retry_attempt: int = 0) -> str:
        """Send one Events API payload in a Socket Mode envelope; returns its envelope id."""
        assert self.connected.wait(10), "the app never connected"
        envelope_id = f"env-{next(self._ids):04d}"
        envelope = {
            "envelope_id": envelope_id,
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
            "payload": payload,
        }
        self._send(0x1, json.dumps(envelope).encode())
        return envelope_id

    def wait_for_ack(self, envelope_id: str, timeout: float = 10) -> bool:
        """True once the app has acknowledged the envelope."""
        with self._acked:
            return self._acked.wait_for(lambda: envelope_id in self.acks, timeout)

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        self._client = client
        request = b""
        while b"\r\n\r\n" not in request:
            request += client.recv(1024)
        key = next(
            line.split(":", 1)[1].strip()
            for line in request.decode().split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1((key + _WEBSOCKET_GUID).encode()).digest()).decode()
        client.sendall(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        self._send(0x1, json.dumps({"type": "hello", "num_connections": 1}).encode())
        self.connected.set()
        self._receive(client)

    def _receive(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                first, second = reader.read(2)
                opcode, length = first & 0x0F, second & 0x7F
                if length == 126:
                    length = struct.unpack("!H", reader.read(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", reader.read(8))[0]
                mask = reader.read(4) if second & 0x80 else b"\0\0\0\0"
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(reader.read(length)))
                if opcode == 0x9:  # ping
                    self._send(0xA, data)
                elif opcode == 0x8:  # close
                    return
                elif opcode == 0x1:
                    with self._acked:
                        self.acks.append(json.loads(data).get("envelope_id", ""))
                        self._acked.notify_all()
        except (OSError, ValueError):
            return

    def _send(self, opcode: int, data: bytes) -> None:
        length = len(data)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
        assert self._client is not None
        with self._send_lock:
            self._client.sendall(header + data)
