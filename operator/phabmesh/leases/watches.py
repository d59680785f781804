"""The operator process's watches: one list-and-watch per resource, shared by every reader.

The controller (its World), the credential endpoint (its grants and lease index), the
signing keys and the gateway Role keeper all read the same namespaces, bots, bindings,
leases, pods, webhooks and Secrets of phabmesh's namespace. Each
resource is listed and watched once here (:class:`~phabmesh.kube.informer.Informer`), reduced
once to the view the controller keeps; a reader that keeps another reduction takes a
:meth:`~phabmesh.kube.informer.Informer.view` of it, fed by the same watch.

Pods are listed only once the leases are, by a consistent read (newer than the lease list):
every lease of that first list belongs to a pod that the pod list holds, unless the pod is
gone (what the controller's start-up sweep relies on). A consistent read is served by the
API server's watch cache once the cache has caught up with etcd, where etcd reports watch
progress (Kubernetes 1.31 and later), and by etcd elsewhere. Not "not older than" the lease
list's version: that is a version of another resource, which the pods' watch cache of an
etcd without progress reports reaches only with a pod's next write; until then the API
server holds the list (3 s), then refuses it (504).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from phabmesh import identity, resources
from phabmesh.kube import KubeClient, shapes
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import DEFAULT_LIVENESS, Informer
from phabmesh.kube.shapes import Shape
from phabmesh.leases.grants import namespace_labels
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView


@dataclasses.dataclass(frozen=True)
class SecretToken:
    """A Secret of phabmesh's namespace as the controller reads bot tokens from it."""

    version: str
    data: Mapping[str, str]


def secret_token(obj: JSON) -> SecretToken:
    data = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            data[key] = base64.b64decode(value).decode().strip()
        except ValueError:
            continue
    return SecretToken(str((obj.get("metadata") or {}).get("resourceVersion", "")), data)


def _key(text: str) -> tuple[str, str]:
    """``namespace/name`` (an informer's key) as the World's (namespace, name)."""
    namespace, _, name = text.partition("/")
    return (namespace, name)


def _nothing(_obj: JSON) -> None:
    """The base reduction of a resource whose readers each keep their own (views)."""
    return None


class Watches:
    """Start with :meth:`tasks` (each under :func:`phabmesh.tasks.spawn`)."""

    def __init__(
        self,
        client: KubeClient,
        naming: identity.Naming,
        *,
        namespace: str,
        liveness: float = DEFAULT_LIVENESS,
        chunk: int = 500,
        unmeshed_pods: bool = True,
    ) -> None:
        """``unmeshed_pods`` false: only the pods Linkerd's injector labelled are watched
        (``PHABMESH_WATCH_UNMESHED_PODS``)."""

        def informer(
            path: str,
            transform: Callable[[JSON], Any],
            name: str,
            shape: Shape[Any] | None = None,
            params: Mapping[str, str] | None = None,
        ) -> Informer[Any]:
            return Informer(
                client,
                path,
                transform,
                name=name,
                liveness=liveness,
                chunk=chunk,
                shape=shape,
                params=params,
            )

        self.namespaces: Informer[Mapping[str, str]] = informer(
            resources.resource_path("", "v1", "namespaces"), namespace_labels, "namespaces"
        )
        self.bots: Informer[BotView] = informer(resources.bot_path(), BotView.from_body, "bots")
        self.bindings: Informer[BindingView] = informer(
            resources.binding_path(None), BindingView.from_body, "bindings"
        )
        self.leases: Informer[LeaseView] = informer(
            resources.lease_path(None), LeaseView.from_body, "leases", shapes.LEASE
        )
        self.pods: Informer[identity.PodFacts] = informer(
            resources.resource_path("", "v1", "pods"),
            lambda pod: identity.PodFacts.from_pod(pod, naming),
            "pods",
            shapes.POD,
            identity.pod_watch_params(unmeshed_pods),
        )
        self.webhooks: Informer[None] = informer(resources.webhook_path(None), _nothing, "webhooks")
        # The leases of the first lease list, taken as the pods' first list begins: every
        # one whose pod that list lacks is an orphan (the controller's start-up sweep).
        self.first_leases: set[tuple[str, str]] | None = None
        # phabmesh's own namespace: bot tokens (the controller), the signing keys (a view).
        self.secrets: Informer[SecretToken] = informer(
            resources.resource_path("", "v1", "secrets", namespace), secret_token, "secrets"
        )

    @property
    def all(self) -> tuple[Informer[Any], ...]:
        return (
            self.namespaces,
            self.bots,
            self.bindings,
            self.leases,
            self.pods,
            self.webhooks,
            self.secrets,
        )

    @property
    def decisive(self) -> tuple[Informer[Any], ...]:
        """What a lease decision reads: while one of these is lost, none is made."""
        return (self.namespaces, self.bots, self.bindings, self.leases, self.pods)

    async def wait_synced(self) -> None:
        """Until every watch that leases and bot checks read has listed once. Not the
        webhooks': without the PhabricatorWebhook CRD (an upgrade that skipped it) leases
        are served all the same, and that watch keeps trying."""
        needed = (*self.decisive, self.secrets)
        await asyncio.gather(*(informer.synced.wait() for informer in needed))

    async def _pods(self) -> None:
        await self.leases.synced.wait()  # see the module docstring
        if self.first_leases is None:
            self.first_leases = {_key(key) for key in self.leases.items}
        await self.pods.run()

    def tasks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Each watch's loop, by task name."""
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            f"watch:{informer.resource}": informer.run
            for informer in self.all
            if informer is not self.pods
        }
        loops["watch:pods"] = self._pods
        return loops
