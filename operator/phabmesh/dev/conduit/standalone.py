"""``phabmesh dev-conduit``: the Conduit test server on its own, beside ``make dev-cluster``.

It stands in for Phabricator at a fixed port on 127.0.0.1 with one or more bots. Each bot's
token goes where phabmesh reads it: with a cluster configured (``$KUBECONFIG``), into the
Secret ``<bot>-token`` (key ``token``) of phabmesh's namespace, created or replaced, the
namespace too if need be; without one, into a file only its owner may read. The token is
never printed. Ctrl-C stops it.
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from phabmesh.dev.conduit.server import ConduitServer
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.kube.client import JSON
from phabmesh.kube.config import kubeconfig_available
from phabmesh.resources import resource_path

DEFAULT_PORT = 8081


def secret_body(name: str, token: str) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "phabmesh-dev"}},
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


async def put_secret(kube: KubeClient, namespace: str, name: str, token: str) -> None:
    """Secret ``namespace/name`` holding ``token`` under key ``token``: created, or replaced."""
    wanted = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    with contextlib.suppress(Conflict):  # there already
        await kube.create(resource_path("", "v1", "namespaces"), wanted)
    body = secret_body(name, token)
    try:
        await kube.create(resource_path("", "v1", "secrets", namespace), body)
    except Conflict:
        await kube.merge_patch(resource_path("", "v1", "secrets", namespace, name), body)


async def serve(
    port: int,
    bots: Sequence[str],
    namespace: str,
    until: Callable[[], Awaitable[None]],
    say: Callable[[str], None] = print,
) -> None:
    """Serve until ``until()`` (awaited) returns."""
    async with ConduitServer(port=port) as server:
        say(f"Conduit test server (standing in for Phabricator) at {server.url}")
        say(f"  PHABMESH_PHABRICATOR_URL={server.url}")
        kube = KubeClient(load_connection()) if kubeconfig_available() else None
        files = None if kube is not None else Path(tempfile.mkdtemp(prefix="phabmesh-conduit-"))
        try:
            for bot in bots:
                server.add_user(bot, bot=True, real_name=bot)
                token = server.add_token(bot)
                if kube is not None:
                    await put_secret(kube, namespace, f"{bot}-token", token)
                    where = f"Secret {namespace}/{bot}-token (key token)"
                else:
                    assert files is not None
                    path = files / f"{bot}.token"
                    path.touch(mode=0o600)
                    path.write_text(token + "\n")
                    where = f"{path} (no cluster configured)"
                say(f"  bot {bot}: its token is in {where}")
        finally:
            if kube is not None:
                await kube.close()
        say("Ctrl-C stops it.")
        await until()
