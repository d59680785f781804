"""A flood of big AdmissionReviews at the injection webhook, from a process of its own.

    python -m bench.webhook_flood PORT SECONDS [CONNECTIONS] [BYTES] [NAMESPACE] [ACCOUNT]

``CONNECTIONS`` (8) TLS connections to 127.0.0.1:PORT each send one AdmissionReview of
about ``BYTES`` (400 000) after another, for ``SECONDS``: a pod of ``ACCOUNT``
(``runner``) in ``NAMESPACE`` (``default``) with thousands of environment variables, well
formed, so the webhook parses every one it accepts, and injects it when a binding there
names the account (anyone may send any review: the costliest one is a bound pod's). Prints
``started`` at once, then the count of answers by status (and of connection errors) as
JSON. Used by ``bench.hostile`` and tests/integration/test_webhook_isolation.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time


def review(size: int, namespace: str = "default", account: str = "runner") -> bytes:
    # Many small objects (environment variables of a few containers), as a big pod has:
    # each one costs its parser more than one long string of the same size would.
    env = [{"name": f"VARIABLE_{i:05d}", "value": f"value-{i:05d}"} for i in range(size // 48)]
    containers = [
        {"name": f"app-{c}", "image": "registry.invalid/app:1", "env": env[c::4]} for c in range(4)
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "flood", "namespace": namespace, "labels": {"app": "runner"}},
        "spec": {"serviceAccountName": account, "containers": containers},
    }
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    request = {  # as the API server sends it
        "uid": "5b1f0c2e-0000-4000-8000-000000000000",
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "name": "flood",
        "namespace": namespace,
        "operation": "CREATE",
        "userInfo": {"username": f"system:serviceaccount:{namespace}:{account}", "groups": []},
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(body).encode()


async def flood(
    port: int,
    seconds: float,
    connections: int = 8,
    size: int = 400_000,
    namespace: str = "default",
    account: str = "runner",
) -> dict[str, int]:
    body = review(size, namespace, account)
    head = (
        "POST /inject HTTP/1.1\r\nHost: phabmesh-webhook\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # an attacker checks nothing
    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            except OSError:
                counts["error"] = counts.get("error", 0) + 1
                await asyncio.sleep(0.05)
                continue
            try:
                while time.monotonic() < deadline:
                    writer.write(head + body)
                    await writer.drain()
                    status = (await reader.readline()).split()[1].decode()
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    counts[status] = counts.get(status, 0) + 1
                    if status != "200":
                        break  # the server closes after a refusal
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                counts["error"] = counts.get("error", 0) + 1
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    connections = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 400_000
    namespace = sys.argv[5] if len(sys.argv) > 5 else "default"
    account = sys.argv[6] if len(sys.argv) > 6 else "runner"
    print("started", flush=True)
    counts = asyncio.run(flood(port, seconds, connections, size, namespace, account))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
