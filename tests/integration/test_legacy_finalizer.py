"""Earlier versions had kopf keep its finalizer on every PhabricatorBot (for a re-check timer).
This version puts none, and takes that one off (and only that one), so that deleting a bot
never waits for ever."""

from __future__ import annotations

import uuid
from typing import Any

from kubernetes import client

from phabmesh import resources
from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster, wait_for
from tests.phab import make_bot
from tests.stack import Threaded

G, V = resources.GROUP, resources.VERSION


def _bot(cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = cluster.custom.get_cluster_custom_object(
            G, V, resources.BOT_PLURAL, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def test_kopfs_old_finalizer_is_taken_off_a_bot_and_only_that_one(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded
) -> None:
    name = f"legacy-{uuid.uuid4().hex[:6]}"
    make_bot(cluster, conduit, name)
    held = ["example.com/hold", resources.KOPF_FINALIZER]
    cluster.custom.patch_cluster_custom_object(
        G, V, resources.BOT_PLURAL, name, {"metadata": {"finalizers": held}}
    )
    wait_for(
        lambda: ((_bot(cluster, name) or {})["metadata"].get("finalizers")) == held[:1],
        what="kopf's finalizer taken off, the other kept",
    )
    cluster.custom.patch_cluster_custom_object(
        G, V, resources.BOT_PLURAL, name, {"metadata": {"finalizers": None}}
    )
    cluster.custom.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, name)
    wait_for(lambda: _bot(cluster, name) is None, what="the bot gone")
