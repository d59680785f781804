"""Decode only the fields a reader keeps: typed decoding of list pages and watch events.

A pod as the API server returns it is 3-6 KB of JSON (managed fields, volumes, conditions,
container statuses), and decoding it into dicts costs about 50-100 µs of CPU: at 50,000 pods,
most of an operator's restart and most of what a scale-up's watch events cost. A reader
keeps a dozen fields of it (:class:`phabmesh.identity.PodFacts`). A :class:`Shape` declares
those fields as msgspec Structs; its decoder skips everything else without building it
(about ten times faster) and hands the reader the same dicts the API's JSON would give,
holding only the declared fields.

Each Shape must declare every field that any reader of its collection reads:
``tests/unit/test_shapes.py`` compares every reduction of a pod (the controller's, the
gateway's) from the whole body and from its shape. A body that does not fit the declared
types (which the API never sends) is decoded whole, as before.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

JSON = dict[str, Any]
T = TypeVar("T")


class _Struct(msgspec.Struct, omit_defaults=True):
    """Fields left at their default are omitted on the way back to dicts, as the API omits
    unset fields."""


class ListMeta(_Struct):
    resourceVersion: str | None = None
    # `continue` is a keyword.
    continue_: str | None = msgspec.field(default=None, name="continue")


class ListOf(_Struct, Generic[T]):
    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    items: list[T] | None = None


class RawEvent(_Struct):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"{}")


class Shape(Generic[T]):
    """The list and event decoders of one collection whose items have the shape ``item``."""

    def __init__(self, item: type[T]) -> None:
        self.item = item
        self._list = msgspec.json.Decoder(ListOf[item])  # type: ignore[valid-type]
        self._one = msgspec.json.Decoder(item)
        self._event = msgspec.json.Decoder(RawEvent)

    def page(self, data: bytes) -> JSON:
        """A list page: ``metadata`` (resourceVersion, continue) and ``items``."""
        try:
            out: JSON = msgspec.to_builtins(self._list.decode(data))
        except msgspec.ValidationError:
            return msgspec.json.decode(data)  # type: ignore[no-any-return]
        return out

    def event(self, data: bytes) -> JSON:
        """A watch event; an ERROR event's object (a Status) is kept whole."""
        try:
            raw = self._event.decode(data)
            if raw.type == "ERROR":
                return {"type": raw.type, "object": msgspec.json.decode(raw.object)}
            return {"type": raw.type, "object": msgspec.to_builtins(self._one.decode(raw.object))}
        except msgspec.ValidationError:
            return msgspec.json.decode(data)  # type: ignore[no-any-return]


# -- pods ---------------------------------------------------------------------------------------


class EnvVar(_Struct):
    name: str | None = None
    value: str | None = None


class Container(_Struct):
    name: str | None = None
    env: list[EnvVar] | None = None


class ContainerStatus(_Struct):
    name: str | None = None
    state: dict[str, Any] | None = None


class PodMeta(_Struct):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resourceVersion: str | None = None
    deletionTimestamp: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class PodSpec(_Struct):
    serviceAccountName: str | None = None
    serviceAccount: str | None = None
    nodeName: str | None = None
    containers: list[Container] | None = None
    initContainers: list[Container] | None = None


class PodStatus(_Struct):
    phase: str | None = None
    initContainerStatuses: list[ContainerStatus] | None = None


class Pod(_Struct):
    """What phabmesh's readers of pods read (``identity.PodFacts``, ``podends.pod_life``,
    the informer's key and version)."""

    metadata: PodMeta | None = None
    spec: PodSpec | None = None
    status: PodStatus | None = None


POD: Shape[Pod] = Shape(Pod)


# -- leases (PhabricatorCredentials) ------------------------------------------------------------


class LeaseMeta(_Struct):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resourceVersion: str | None = None


class LeaseSpec(_Struct):
    podUID: str | None = None
    podName: str | None = None
    binding: str | None = None
    bot: str | None = None
    identity: str | None = None


class LeaseStatus(_Struct):
    phase: str | None = None
    reason: str | None = None
    botPHID: str | None = None
    issuedAt: str | None = None
    expiresAt: str | None = None
    renewedAt: str | None = None


class Lease(_Struct):
    """What ``phabmesh.leases.view.LeaseView`` reads of a lease, and the informer's key and
    version. Every lease's renewal is a watch event of each process: decoded here alone."""

    metadata: LeaseMeta | None = None
    spec: LeaseSpec | None = None
    status: LeaseStatus | None = None


LEASE: Shape[Lease] = Shape(Lease)
