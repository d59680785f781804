"""A Phabricator URL that redirects elsewhere, and the elsewhere that records what reached it:
two real HTTP servers on 127.0.0.1, for the tests that no client carrying a bot token follows
a redirect."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Redirects:
    """``url`` answers every POST with ``status`` (set it per case) and a Location on the
    recorder (``localhost``: another host name than the one called); ``received`` holds
    each (headers, body) the recorder got."""

    url: str
    target_port: int
    status: int = 307
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def got(self, secret: str) -> bool:
        """Whether ``secret`` reached the other host in any header or body."""
        return any(
            secret in str(headers) or secret.encode() in body for headers, body in self.received
        )


@contextmanager
def redirecting() -> Iterator[Redirects]:
    state: dict[str, Any] = {}

    class Recorder(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state["redirects"].received.append((dict(self.headers), body))
            answer = b'{"result":{"phid":"PHID-USER-evil","userName":"evil"},"error_code":null}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_GET = _record

        def log_message(self, *args: Any) -> None:
            pass

    class Redirector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            redirects: Redirects = state["redirects"]
            self.send_response(redirects.status)
            self.send_header("Location", f"http://localhost:{redirects.target_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    servers = [
        http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for handler in (Recorder, Redirector)
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    recorder, redirector = servers
    state["redirects"] = Redirects(
        f"http://127.0.0.1:{redirector.server_port}", recorder.server_port
    )
    try:
        yield state["redirects"]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


REDIRECT_STATUSES = (301, 302, 303, 307, 308)
