"""Integration fixtures (the session's conduit, operator and gateway are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster
from tests.phab import (
    bind,
)
from tests.stack import Threaded


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    """A namespace with a Ready binding `runners` of a Ready bot `bot-<namespace>`."""
    bind(cluster, conduit, namespace, credentialTTL="2m")
    return namespace
