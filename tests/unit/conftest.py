"""Fixtures of the unit tests: a credential endpoint stand-in on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest


class FakeEndpoint(BaseHTTPRequestHandler):
    """Answers each POST with the next of ``answers`` (the last one again and again) and
    keeps what it was sent in ``seen``."""

    answers: ClassVar[list[tuple[int, dict[str, object]]]] = []
    seen: ClassVar[list[dict[str, str]]] = []
    extra_headers: ClassVar[dict[str, str]] = {}  # sent with every answer

    def do_POST(self) -> None:
        self.seen.append({"auth": self.headers.get("Authorization", ""), "path": self.path})
        # In turn; the last one answers every call after it.
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    FakeEndpoint.answers, FakeEndpoint.seen, FakeEndpoint.extra_headers = [], [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
