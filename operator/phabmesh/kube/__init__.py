"""A small asyncio Kubernetes API client (aiohttp) shared by every phabmesh process.

kopf drives the controller's handlers; this client does the controller's writes,
the credential endpoint's TokenReviews and the gateway's watches, without threads
and with one pooled connection set per process.
"""

from phabmesh.kube.client import Conflict, KubeClient, KubeError, NotFound, Unavailable
from phabmesh.kube.config import Connection, load_connection

__all__ = [
    "Conflict",
    "Connection",
    "KubeClient",
    "KubeError",
    "NotFound",
    "Unavailable",
    "load_connection",
]
