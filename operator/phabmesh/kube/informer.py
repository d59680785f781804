"""List-then-watch caches of Kubernetes objects, reduced to small values.

An :class:`Informer` lists a collection in pages, then watches it from the
list's resourceVersion, keeping ``items`` (key ``namespace/name`` → the value
``transform`` made of the object) current. It resumes after disconnects from
the last version seen (bookmarks included), lists again after ``410 Gone``
(emitting DELETED for objects that vanished meanwhile), and reports whether it
is ``connected`` so that readers can fail closed while it is not. Any other
exception (a transform's, a reader's handler's, an unreadable answer) is logged (``watch_failed``),
counted (``phabmesh_task_failures_total{task="watch:<resource>"}``), leaves it
disconnected, and it lists again after a pause: a watch never dies silently.

One watch can feed several readers that each keep their own reduction of the objects:
:meth:`Informer.view` adds a :class:`View` with its own ``transform``, kept current by the
informer's list and watch (one request stream, however many readers). A view is connected,
synced and healthy exactly when its informer is.

A watch can also stall without breaking (the connection stays open, nothing comes):
each watch asks the API server to end it within two thirds of ``liveness``, and the
server sends a bookmark 2 s before that end (and about every minute), so a healthy watch
is never silent that long. One silent for ``liveness`` seconds counts as lost:
``connected`` goes False and a new watch resumes from the last version seen.

After a failure it waits before listing or watching again: the short form of the process's
retry policy (:meth:`phabmesh.backoff.Backoff.short`, its client's ``policy``), or what the
API server's ``Retry-After`` asked (of a list or of a watch) up to that form's cap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import structlog

from phabmesh import metrics
from phabmesh.backoff import Backoff
from phabmesh.kube.client import JSON, Gone, KubeClient, KubeError, Unavailable
from phabmesh.kube.shapes import Shape

V = TypeVar("V")
W = TypeVar("W")
log = structlog.get_logger(__name__)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
# Seconds of silence after which a watch counts as lost (see the module docstring).
DEFAULT_LIVENESS = 30.0


# Which resource a collection's path names, for the watch metrics (phabmesh_watch_*{resource}).
_RESOURCES = {
    "pods": "pods",
    "namespaces": "namespaces",
    "secrets": "secrets",
    "phabricatorcredentials": "leases",
    "phabricatorbindings": "bindings",
    "phabricatorbots": "bots",
    "phabricatorwebhooks": "webhooks",
}


def resource_of(path: str) -> str:
    """``leases``, ``pods``... for a collection path; ``other`` for anything else."""
    return _RESOURCES.get(path.rstrip("/").rsplit("/", 1)[-1], metrics.OTHER)


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class _Reader(Generic[V]):
    """What a reader of a collection keeps: ``items`` (key → its reduction of the object),
    kept by :meth:`_put` and :meth:`_drop`, which call its handlers."""

    def __init__(
        self,
        transform: Callable[[JSON], V],
        on_event: Callable[[str, str, V | None], None] | None,
        name: str,
    ) -> None:
        self.transform = transform
        self.on_event = on_event
        self.name = name
        self._listeners: list[Callable[[str, str, V | None], None]] = []
        self.items: dict[str, V] = {}
        # While an event is emitted: the value the object had before it (None when it is new,
        # and between events).
        self.previous: V | None = None

    def subscribe(self, handler: Callable[[str, str, V | None], None]) -> None:
        """Call ``handler`` on each event too, after ``on_event`` (for a second reader of a
        shared informer)."""
        self._listeners.append(handler)

    def _emit(self, kind: str, key: str, value: V | None) -> None:
        """Every handler on one event; then the first failure, if any, is raised: a reader
        whose handler failed no longer knows what it holds, so the watch counts as failed
        (its readers fail closed) and lists again."""
        handlers = [self.on_event] if self.on_event is not None else []
        failure: Exception | None = None
        for handler in [*handlers, *self._listeners]:
            try:
                handler(kind, key, value)
            except Exception as exc:
                log.exception("informer_handler_failed", informer=self.name, key=key)
                failure = failure or exc
        if failure is not None:
            raise failure

    def _put(self, kind: str, key: str, obj: JSON) -> None:
        value = self.transform(obj)
        self.previous = self.items.get(key)
        self.items[key] = value
        try:
            self._emit(kind, key, value)
        finally:
            self.previous = None

    def _drop(self, key: str) -> None:
        self.previous = self.items.pop(key, None)
        try:
            self._emit(DELETED, key, None)
        finally:
            self.previous = None


class Informer(_Reader[V]):
    def __init__(
        self,
        client: KubeClient,
        path: str,
        transform: Callable[[JSON], V],
        *,
        params: Mapping[str, str] | None = None,
        on_event: Callable[[str, str, V | None], None] | None = None,
        name: str = "",
        chunk: int = 500,
        watch_timeout: int | None = None,
        liveness: float = DEFAULT_LIVENESS,
        reconnect: Backoff | None = None,
        shape: Shape[Any] | None = None,
    ) -> None:
        """``shape``: the fields that ``transform`` and every view read (only those are
        decoded: :mod:`phabmesh.kube.shapes`); by default every field."""
        super().__init__(transform, on_event, name or path)
        self.shape = shape
        # A version the first list must be at least as new as ("": a consistent read); each
        # later list is at least as new as what this informer has seen. Either is served by
        # the API server's watch cache (KubeClient.list_pages). Only a version of this
        # collection: another resource's is one its watch cache may not reach until its next
        # write where etcd does not report progress (the list is then held 3 s, and read
        # consistently after all).
        self.not_older_than = ""
        self.client = client
        # The pause before listing or watching again after a failure (module docstring);
        # None: the short form of the client's policy.
        self.reconnect = reconnect
        self.path = path
        self.params = dict(params or {})
        self.chunk = chunk
        self.liveness = liveness
        self.watch_timeout = watch_timeout or max(1, int(liveness * 2 / 3))
        self.read_deadline = max(liveness, self.watch_timeout + 1.0)
        self._views: list[View[Any]] = []
        self.synced = asyncio.Event()
        self.connected = False
        self.resource_version = ""
        # For the watch metrics: what is watched, and when the watch last proved alive (a
        # list, the server accepting a watch, an event or a bookmark). Unix time; 0: never.
        self.resource = resource_of(path)
        self.alive_at = 0.0
        metrics.current().watches.add(self)

    @property
    def healthy(self) -> bool:
        """Connected and synced: what the process knows of the collection is current."""
        return self.connected and self.synced.is_set()

    def view(
        self,
        transform: Callable[[JSON], W],
        *,
        on_event: Callable[[str, str, W | None], None] | None = None,
        name: str = "",
        only: str | None = None,
    ) -> View[W]:
        """Another reader's reduction of the same objects, fed by this informer (module
        docstring); ``only``: of the one object of that key (``namespace/name``). Made
        before :meth:`run` starts, so that it sees the first list."""
        view = View(self, transform, on_event=on_event, name=name or self.name, only=only)
        self._views.append(view)
        return view

    def _put(self, kind: str, key: str, obj: JSON) -> None:
        super()._put(kind, key, obj)
        for view in self._views:
            view._put(kind, key, obj)

    def _drop(self, key: str) -> None:
        super()._drop(key)
        for view in self._views:
            view._drop(key)

    async def relist(self) -> None:
        """List the collection again, a page at a time: each page reduced as it comes (one
        page of bodies held at once), other tasks let run between pages; then what the list
        no longer holds is DELETED."""
        listed: set[str] = set()
        version = ""
        async for page, page_version in self.client.list_pages(
            self.path,
            self.params,
            self.chunk,
            self.shape,
            not_older_than=self.resource_version or self.not_older_than,
        ):
            version = page_version
            for obj in page:
                key = object_key(obj)
                listed.add(key)
                self._put(MODIFIED if key in self.items else ADDED, key, obj)
            del page
            await asyncio.sleep(0)
        for key in [k for k in self.items if k not in listed]:
            self._drop(key)
        self.resource_version = version
        self.connected = True
        self.alive_at = time.time()
        self.synced.set()
        for view in self._views:
            view.synced.set()

    def _opened(self) -> None:
        """The API server accepted a watch from our version: nothing is missed from here."""
        if not self.connected:
            log.info("watch_connected", informer=self.name)
        self.connected = True
        self.alive_at = time.time()

    def _apply(self, event: JSON) -> None:
        kind = event.get("type", "")
        obj = event.get("object") or {}
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        self.alive_at = time.time()
        if kind == "BOOKMARK":
            return
        key = object_key(obj)
        if kind == DELETED:
            self._drop(key)
        elif kind in (ADDED, MODIFIED):
            self._put(kind, key, obj)

    async def run(self) -> None:
        """Run until cancelled."""
        pauses = self.reconnect or self.client.policy.short()
        failures = 0  # since the last event: the pause before the next attempt grows
        need_list = True
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                async for event in self.client.watch(
                    self.path,
                    self.resource_version,
                    self.params,
                    self.watch_timeout,
                    idle_timeout=self.read_deadline,
                    opened=self._opened,
                    shape=self.shape,
                ):
                    self.connected = True
                    failures = 0
                    self._apply(event)
                # The server closed the stream (timeoutSeconds): resume from the last version.
            except Gone:
                # Events were missed: what the readers hold is not current until the new
                # list is in (they fail closed meanwhile).
                log.info("watch_expired", informer=self.name)
                self.connected = False
                need_list = True
            except KubeError as exc:
                if self.connected:
                    log.warning("watch_disconnected", informer=self.name, error=str(exc))
                self.connected = False
                failures += 1
                await asyncio.sleep(pauses.delay(failures, exc.retry_after))
                if not isinstance(exc, Unavailable):
                    need_list = True
            except Exception:
                # A fault of our own (a transform, an answer we could not read): readers fail
                # closed until a new list has replaced whatever the fault left half-applied.
                log.exception("watch_failed", informer=self.name)
                metrics.current().task_failed(f"watch:{self.resource}")
                self.connected = False
                need_list = True
                failures += 1
                await asyncio.sleep(pauses.delay(failures))


class View(_Reader[V]):
    """A reader's own reduction of an :class:`Informer`'s objects (:meth:`Informer.view`):
    ``items``, ``synced``, ``connected`` and ``healthy`` as an informer has them, kept
    current by the informer it was made from. :meth:`run` waits: the informer runs."""

    def __init__(
        self,
        source: Informer[Any],
        transform: Callable[[JSON], V],
        *,
        on_event: Callable[[str, str, V | None], None] | None = None,
        name: str = "",
        only: str | None = None,
    ) -> None:
        super().__init__(transform, on_event, name)
        self.source = source
        self.only = only
        self.resource = source.resource
        self.synced = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.source.connected

    @property
    def healthy(self) -> bool:
        return self.source.healthy

    def _put(self, kind: str, key: str, obj: JSON) -> None:
        if self.only is None or key == self.only:
            super()._put(kind, key, obj)

    def _drop(self, key: str) -> None:
        if self.only is None or key == self.only:
            super()._drop(key)

    async def run(self) -> None:
        """Nothing to run: the informer feeds this view. Waits until cancelled."""
        await asyncio.Event().wait()


Watched = Informer[V] | View[V]  # what a reader of a collection is given
