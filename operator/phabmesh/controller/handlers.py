"""What kopf still does for the controller: log in, start and stop it.

kopf runs standalone and watches nothing: the process's shared watches
(:mod:`phabmesh.leases.watches`) feed the controller (:mod:`phabmesh.controller.driver`),
and which replica acts is :mod:`phabmesh.controller.peering`'s. kopf runs the start-up and
clean-up below; its ``ready_flag`` is set once :func:`configure` has returned, that is once
every watch has listed and the start-up sweep has run.
"""

from __future__ import annotations

from typing import Any

import kopf
import structlog

from phabmesh.controller.memo import Memo

log = structlog.get_logger(__name__)
registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    settings.posting.enabled = False  # no kopf handler runs on an object: nothing to post
    # kopf serves no resource: it need not follow the cluster's CRDs (a watch of its own).
    settings.scanning.disabled = True
    settings.networking.request_timeout = 30
    # The injection webhook is not kopf's: it runs in a process of its own
    # (phabmesh.admission.server), off this event loop.
    settings.admission.server = None
    settings.admission.managed = None
    await memo.start()


@kopf.on.cleanup(registry=registry)
async def shutdown(memo: Memo, **_: Any) -> None:
    await memo.stop()


__all__ = ["configure", "login", "shutdown"]
