"""The phabmesh controller: bots, bindings, pods and leases, driven by the process's watches."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any, cast

import kopf

from phabmesh.controller import peering
from phabmesh.settings import Settings

if TYPE_CHECKING:
    from phabmesh.controller.memo import Memo


async def operate(
    settings: Settings,
    *,
    kubeconfig: str | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    standalone: bool = True,
    peering_name: str | None = None,
    liveness_endpoint: str | None = None,
    peering_identity: str | None = None,
    peering_priority: int | None = None,
    memo: Memo,
) -> None:
    """Run the controller until ``stop_flag`` is set (or the task is cancelled).

    The pod-injection webhook is not kopf's: it has a process of its own
    (:mod:`phabmesh.admission.server`). ``peering_identity`` and ``peering_priority``
    are this replica's in kopf's peering (:mod:`phabmesh.controller.peering` reads the
    peering object back with them); by default kopf's own identity and a random priority.
    """
    from phabmesh.controller import handlers

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's login reads it
    await kopf.operator(
        registry=handlers.registry,
        memo=memo,
        clusterwide=True,
        standalone=standalone,
        peering_name=peering_name,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
        # kopf's peering identity type is a NewType of str that kopf does not export.
        identity=cast(Any, peering_identity),
        priority=peering_priority or peering.new_priority(),
    )
