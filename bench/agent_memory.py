"""The credential agent's memory: ``python -m bench.agent_memory [--seconds 20] [--ttl 30]``.

Runs ``phabmesh agent sidecar`` as its own process, as in a pod, against a loopback
stand-in for the credential endpoint that issues credentials living ``--ttl`` seconds (so
the agent refreshes several times), and prints the process's resident memory (VmRSS) after
its first write and at the end, and its peak (VmHWM). Linux only (reads /proc). Nothing
here asserts: it measures and prints. The webhook's memory limit for the agent
(``phabmesh.admission.inject.AGENT_RESOURCES``) is printed beside the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from phabmesh.admission import inject


def _endpoint(ttl: float) -> ThreadingHTTPServer:
    issued = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            issued[0] += 1
            expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=ttl)
            body = json.dumps(
                {
                    "credential": f"api-{issued[0]:028d}",
                    "expiresAt": expires.isoformat(),
                    "binding": "bench",
                    "bot": "bench-bot",
                    "format": "phorge-token",
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--ttl", type=float, default=30.0)
    args = parser.parse_args()
    server = _endpoint(args.ttl)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "token").write_text("a-service-account-token")
        argv = [sys.executable, "-m", "phabmesh.cli", "agent", "sidecar", "--dir", str(work)]
        argv += ["--endpoint", f"http://127.0.0.1:{server.server_address[1]}"]
        argv += ["--token-file", str(work / "token"), "--gateway", "http://gateway:8080"]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ)
        )
        try:
            started = time.monotonic()
            while not (work / "credential").exists():
                if proc.poll() is not None or time.monotonic() - started > 60:
                    raise SystemExit("the agent wrote no credential")
                time.sleep(0.05)
            first = _status(proc.pid)
            first_write = time.monotonic() - started
            time.sleep(args.seconds)
            last = _status(proc.pid)
            rewritten = (work / "credential").read_text().strip()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            server.shutdown()
    limit = inject.AGENT_RESOURCES["limits"]["memory"]
    print(f"phabmesh agent sidecar, Python {sys.version.split()[0]}, credential TTL {args.ttl:g} s")
    print(f"first credential written after {first_write * 1000:.0f} ms")
    print(f"RSS after the first write: {first['VmRSS'] / 1024:.1f} MiB")
    rss, peak = last["VmRSS"] / 1024, last["VmHWM"] / 1024
    print(f"RSS after {args.seconds:g} s: {rss:.1f} MiB, peak {peak:.1f} MiB")
    print(f"credentials issued meanwhile: {int(rewritten[4:])} (last one written)")
    request = inject.AGENT_RESOURCES["requests"]["memory"]
    print(f"memory limit the webhook sets: {limit}, request {request}")


if __name__ == "__main__":
    main()
