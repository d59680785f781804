"""A Kubernetes Event's body (core/v1), as phabmesh's processes and its kubectl plugin post them."""

from __future__ import annotations

import datetime
import uuid

from phabmesh.clock import format_time
from phabmesh.kube.client import JSON


def event_body(
    ref: JSON,
    reason: str,
    message: str,
    type_: str,
    now: datetime.datetime,
    *,
    source: str,
    reporting_component: str,
) -> JSON:
    """An Event about ``ref`` (an ``involvedObject``) in its namespace ("default" for a
    cluster-scoped object), named after it with a random suffix, its message capped at 1 KiB."""
    stamp = format_time(now)
    namespace = str(ref.get("namespace") or "default")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{ref.get('name', 'phabmesh')}.{uuid.uuid4().hex[:12]}"[:253],
            "namespace": namespace,
        },
        "involvedObject": ref,
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": source},
        "reportingComponent": reporting_component,
        "reportingInstance": source,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
