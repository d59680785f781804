"""Integration fixtures (the session's conduit, operator and gateway are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from phabmesh.dev.conduit_server import ConduitServer
from tests.kube import Cluster, wait_for
from tests.phab import (
    binding_condition,
    label_namespace,
    make_binding,
    make_bot,
)
from tests.stack import Threaded


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    """A namespace with a Ready binding `runners` of a Ready bot `bot-<namespace>`."""
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot, credentialTTL="2m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    return namespace
