"""A PhabricatorCredential (lease) reduced to the few fields every process needs.

Shared by the controller, the credential endpoint and the gateway; pure data.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Mapping
from typing import Any

from phabmesh.clock import parse_time
from phabmesh.credentials import phorge


def older_version(mine: str, theirs: str) -> bool:
    """Is ``mine`` an earlier resourceVersion of an object than ``theirs`` (a watch event
    that arrives after the answer to this process's own write)?

    Compared as integers: Kubernetes' resource versions are comparable (KEP-5504, stable
    since 1.35, checked by conformance: positive integers without leading zeros). An API
    server outside that contract gives versions that are not numbers: unknown, so False
    (the event is taken)."""
    return mine.isdigit() and theirs.isdigit() and int(mine) < int(theirs)


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseView:
    namespace: str
    name: str
    pod_uid: str
    pod_name: str
    binding: str
    bot: str
    identity: str
    phase: str
    expires_at: datetime.datetime | None
    issued_at: datetime.datetime | None

    uid: str = ""
    reason: str = ""
    bot_phid: str = ""
    resource_version: str = ""
    # When its current term began (its last renewal or shortening; its issue at first).
    renewed_at: datetime.datetime | None = None

    def older_than(self, other: LeaseView) -> bool:
        """Is this an earlier state of the same object than ``other`` (a watch event that
        arrives after the writer's own answer)?"""
        return older_version(self.resource_version, other.resource_version)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def active(self) -> bool:
        return self.phase == "Active"

    def phorge_digest(self) -> bytes:
        """What a Phorge-shaped credential of this lease is MACed over (its immutable facts)."""
        return phorge.lease_digest(
            lease_uid=self.uid,
            pod_uid=self.pod_uid,
            namespace=self.namespace,
            binding=self.binding,
            bot=self.bot,
            identity=self.identity,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LeaseView:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        # Thousands are kept: the strings many leases share (namespace, binding, bot,
        # identity, phase, reason, the bot's PHID) are interned, held once.
        return cls(
            namespace=sys.intern(str(meta.get("namespace"))),
            name=str(meta.get("name")),
            pod_uid=str(spec.get("podUID", "")),
            pod_name=str(spec.get("podName", "")),
            binding=sys.intern(str(spec.get("binding", ""))),
            bot=sys.intern(str(spec.get("bot", ""))),
            identity=sys.intern(str(spec.get("identity", ""))),
            phase=sys.intern(str(status.get("phase") or "Pending")),
            expires_at=parse_time(status.get("expiresAt")),
            issued_at=parse_time(status.get("issuedAt")),
            uid=str(meta.get("uid", "")),
            reason=sys.intern(str(status.get("reason") or "")),
            bot_phid=sys.intern(str(status.get("botPHID") or "")),
            resource_version=str(meta.get("resourceVersion") or ""),
            renewed_at=parse_time(status.get("renewedAt")),
        )
