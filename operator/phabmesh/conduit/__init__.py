"""Conduit, Phabricator's API: wire formats, errors, and a client. Knows nothing of Kubernetes."""

from phabmesh.conduit.client import ConduitClient, Constraints, User, WhoAmI
from phabmesh.conduit.errors import (
    UNAVAILABLE,
    CallError,
    ConduitError,
    CoreError,
    InvalidAuth,
    InvalidSession,
    PhabricatorUnavailable,
    error_for,
)

__all__ = [
    "UNAVAILABLE",
    "CallError",
    "ConduitClient",
    "ConduitError",
    "Constraints",
    "CoreError",
    "InvalidAuth",
    "InvalidSession",
    "PhabricatorUnavailable",
    "User",
    "WhoAmI",
    "error_for",
]
