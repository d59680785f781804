"""The phabmesh controller: bots, bindings, pods and leases, driven by the process's watches."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING

import kopf

from phabmesh.settings import Settings

if TYPE_CHECKING:
    from phabmesh.controller.memo import Memo


async def operate(
    settings: Settings,
    *,
    kubeconfig: str | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    liveness_endpoint: str | None = None,
    memo: Memo,
) -> None:
    """Run the controller until ``stop_flag`` is set (or the task is cancelled).

    kopf runs standalone: it logs in, starts and stops the controller, and watches nothing.
    Which replica acts is :mod:`phabmesh.controller.peering`'s (kopf's peering protocol,
    kept by phabmesh). The pod-injection webhook is not kopf's either: it has a process of
    its own (:mod:`phabmesh.admission.server`).
    """
    from phabmesh.controller import handlers

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # kopf's login reads it
    await kopf.operator(
        registry=handlers.registry,
        memo=memo,
        clusterwide=True,
        standalone=True,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
    )
