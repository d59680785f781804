"""Where the API server is and how to authenticate: kubeconfig or in-cluster."""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

SA_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclasses.dataclass(frozen=True)
class Connection:
    """The API server's URL, TLS settings and a source of the Authorization header."""

    host: str
    ssl_context: ssl.SSLContext | bool
    authorization: Callable[[], str | None]
    kubeconfig: str | None = None

    def headers(self) -> dict[str, str]:
        value = self.authorization()
        return {"Authorization": value} if value else {}


def kubeconfig_available() -> bool:
    """True when a kubeconfig or an in-cluster service account is there to use."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SA_TOKEN_FILE.is_file():
        return True
    paths = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
    return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """Connect via ``kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config`` or in-cluster
    (``context``: that kubeconfig context instead of its current one)."""
    cfg = k8s_client.Configuration()
    in_cluster = (
        kubeconfig is None and context is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    )
    if in_cluster and SA_TOKEN_FILE.is_file():
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # untyped upstream
    else:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]  # untyped upstream
            config_file=kubeconfig, context=context, client_configuration=cfg
        )

    ssl_context: ssl.SSLContext | bool
    if cfg.verify_ssl:
        ctx = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.ssl_ca_cert
            else (ssl.create_default_context())
        )
        if cfg.cert_file and cfg.key_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        ssl_context = ctx
    else:
        ssl_context = False

    def authorization() -> str | None:
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)  # in-cluster: re-read the rotated token file
        value = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if not value:
            return None
        prefix = cfg.api_key_prefix.get("authorization")
        return f"{prefix} {value}" if prefix and not value.startswith(prefix) else str(value)

    return Connection(
        host=cfg.host.rstrip("/"),
        ssl_context=ssl_context,
        authorization=authorization,
        kubeconfig=kubeconfig,
    )
