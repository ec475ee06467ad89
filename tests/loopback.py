"""The HTTP server every fake in the tests runs on: loopback only, threaded, quiet about clients that hang up."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer
from typing import Any


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server whose handler threads never outlive the process nor print a hung-up client."""

    daemon_threads = True
    # socketserver's default backlog of 5 drops connections a burst of concurrent clients opens (SYN retried 1 s on)
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is part of the tests, not a server fault; printing it from a
        # handler thread would land in whatever stderr the *next* test is capturing.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
