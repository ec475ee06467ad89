"""How Slack reaches the bot: an HTTP endpoint for the Events API, or a Socket Mode connection."""

import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slack_bolt import App, BoltRequest
from slack_sdk.errors import SlackApiError

from finetune_kit.errors import ConfigError

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
HEALTH_PATH = "/healthz"
MAX_BODY_BYTES = 1 << 20  # Slack's event payloads are a few kB


class EventServer(ThreadingHTTPServer):
    """Serves Slack's Events API requests to a bolt app, one thread per connection."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 resets connections when Slack sends a burst of events

    def __init__(self, app: App, host: str, port: int) -> None:
        super().__init__((host, port), _EventsHandler)
        self.app = app

    @property
    def url(self) -> str:
        """Where Slack should send events (the app's Request URL, behind your HTTPS proxy)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{EVENTS_PATH}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (for tests and benchmarks); `shutdown()` stops it."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        return thread


class _EventsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # an ack is one small write; do not hold it back
    server: EventServer

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        if path != EVENTS_PATH:
            self._send(404, "not found", {})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, "payload too large", {})
            return
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        headers: dict[str, str | Sequence[str]] = {
            name.lower(): value for name, value in self.headers.items()
        }
        response = self.server.app.dispatch(BoltRequest(body=body, query=query, headers=headers))
        self._send(response.status, response.body, response.headers)

    def do_GET(self) -> None:
        if self.path == HEALTH_PATH:
            self._send(200, "ok", {})
        else:
            self._send(404, "not found", {})

    def _send(self, status: int, body: str, headers: dict[str, Any]) -> None:
        data = body.encode()
        self.send_response(status)
        for name, values in headers.items():
            if name.lower() not in ("content-length", "connection"):
                for value in values if isinstance(values, list | tuple) else [values]:
                    self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines go to the debug log, not stderr."""
        log.debug("%s " + format, self.address_string(), *args)


def connect_socket_mode(app: App, app_token: str) -> Any:
    """Open a Socket Mode connection (Slack pushes events over a websocket; no public URL needed)."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    handler = SocketModeHandler(app, app_token)
    try:
        handler.connect()
    except SlackApiError as exc:
        raise ConfigError(
            f"Slack refused a Socket Mode connection ({exc.response.get('error')}) — enable Socket Mode in the "
            "app's settings and check SLACK_APP_TOKEN"
        ) from exc
    return handler
