"""Conduit, Phabricator's API: wire formats, errors, and a client. Knows nothing of Kubernetes."""

from phabmesh.conduit.client import ConduitClient, User, WhoAmI, mask_tokens
from phabmesh.conduit.errors import (
    CallError,
    ConduitError,
    CoreError,
    InvalidAuth,
    InvalidSession,
    PhabricatorUnavailable,
    error_for,
)

__all__ = [
    "CallError",
    "ConduitClient",
    "ConduitError",
    "CoreError",
    "InvalidAuth",
    "InvalidSession",
    "PhabricatorUnavailable",
    "User",
    "WhoAmI",
    "error_for",
    "mask_tokens",
]
