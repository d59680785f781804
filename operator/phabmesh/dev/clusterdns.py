"""Cluster DNS for a real node of the local control plane: CoreDNS as ``kube-system/kube-dns``.

Pods resolve Services by name (``phabmesh-endpoint.phabmesh-system.svc``) through the node's
``clusterDNS`` address, ``CLUSTER_IP``. CoreDNS is built from its Go module with only the
plugins the Corefile below uses (``tests/controlplane/coredns``, ``gobuild.coredns``), put in
an image without a registry (``image``), and installed with its RBAC, Corefile, Deployment and
Service (``manifests``, ``install``).

The server answers for ``cluster.local`` and the reverse zones of the Service and pod ranges
from the API server's Services and EndpointSlices. There is no upstream: the binary has no
forwarding plugin and the Corefile names none, so any other name is refused (REFUSED) without
a packet leaving the server, and an unknown name under its zones gets NXDOMAIN.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from phabmesh.dev import gobuild, ociimage

if TYPE_CHECKING:
    from phabmesh.dev.devcluster import ControlPlane

VERSION = "v1.15.0"  # the CoreDNS that tests/controlplane/coredns/go.mod requires
IMAGE = f"localhost/coredns:{VERSION}"
NAMESPACE = "kube-system"
NAME = "coredns"  # ServiceAccount, ClusterRole(Binding), ConfigMap, Deployment
SERVICE = "kube-dns"  # the Service's usual name: what tools expect to find
CLUSTER_IP = "10.96.0.10"  # the kubelet's clusterDNS
CLUSTER_DOMAIN = "cluster.local"
SERVICE_CIDR = "10.96.0.0/16"  # the API server's --service-cluster-ip-range
POD_CIDR = "10.85.0.0/24"  # the node's CNI bridge
DNS_PORT = 1053  # the container's port: above 1024, so no capability binds it
HEALTH_PORT = 8080
READY_PORT = 8181
UID = GID = 65532  # the image's user "nonroot"
BINARY = "/coredns"
COREFILE_DIR = "/etc/coredns"
LABELS = {"k8s-app": "kube-dns"}
FIELD_MANAGER = "phabmesh-dev"


class ClusterDnsError(RuntimeError):
    """Cluster DNS could not be built or installed."""


def corefile(
    *,
    port: int = DNS_PORT,
    health_port: int = HEALTH_PORT,
    ready_port: int = READY_PORT,
    bind: str | None = None,
    kubeconfig: Path | None = None,
    context: str = "",
) -> str:
    """The Corefile. The defaults are the pod's: every interface, in-cluster credentials.

    ``bind`` (an address) and ``kubeconfig`` (with its ``context``) run the same server as a
    host process: listening on one address only, and talking to the API server as whoever
    the kubeconfig names.
    """
    host = bind or ""
    zones = " ".join(f"{zone}:{port}" for zone in (CLUSTER_DOMAIN, SERVICE_CIDR, POD_CIDR))
    lines = [
        f"{zones} {{",
        *([f"    bind {bind}"] if bind else []),
        "    errors",
        f"    health {host}:{health_port}",
        f"    ready {host}:{ready_port}",
        "    kubernetes {",
        "        pods disabled",
        *([f"        kubeconfig {kubeconfig} {context}".rstrip()] if kubeconfig else []),
        "    }",
        "    cache 30",
        "}",
    ]
    return "\n".join(lines) + "\n"


def manifests(*, node: str | None = None, apiserver: str | None = None) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and its binding, the Corefile's ConfigMap, the Deployment
    and the Service ``kube-system/kube-dns`` at ``CLUSTER_IP``.

    The pod runs on a node with a kubelet: not on the control plane's simulated nodes
    (label ``type=kwok``), and on ``node`` if one is named. It reaches the API server as
    any in-cluster client does, at the ``kubernetes`` Service (``KUBERNETES_SERVICE_HOST``
    and ``_PORT``, which the kubelet sets), or at ``apiserver`` (``HOST:PORT``) if given:
    an address the pod can reach whose name the API server's certificate holds.
    """
    if apiserver is not None:
        host, sep, port = apiserver.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ClusterDnsError(f"apiserver must be HOST:PORT, not {apiserver!r}")
    meta = {"name": NAME, "namespace": NAMESPACE, "labels": dict(LABELS)}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        # What the kubernetes plugin watches with `pods disabled`: Services and their
        # EndpointSlices for the records, namespaces to tell an empty one from a missing one.
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["services", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME, "labels": dict(LABELS)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"Corefile": corefile()},
    }
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "type", "operator": "NotIn", "values": ["kwok"]}]}
                ]
            }
        }
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": NAME,
        "priorityClassName": "system-cluster-critical",
        # Not itself: the server resolves nothing outside its zones, and needs no resolver.
        "dnsPolicy": "Default",
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "coredns",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "args": ["-conf", f"{COREFILE_DIR}/Corefile"],
                "ports": [
                    {"name": "dns", "containerPort": DNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
                    {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                    {"name": "ready", "containerPort": READY_PORT, "protocol": "TCP"},
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/ready", "port": "ready"},
                    "periodSeconds": 2,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/health", "port": "health"},
                    "initialDelaySeconds": 10,
                    "periodSeconds": 10,
                    "failureThreshold": 5,
                },
                "resources": {
                    "requests": {"cpu": "50m", "memory": "32Mi"},
                    "limits": {"memory": "128Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "config", "mountPath": COREFILE_DIR, "readOnly": True}],
            }
        ],
        "volumes": [
            {
                "name": "config",
                "configMap": {"name": NAME, "items": [{"key": "Corefile", "path": "Corefile"}]},
            }
        ],
    }
    if apiserver is not None:
        pod_spec["containers"][0]["env"] = [
            {"name": "KUBERNETES_SERVICE_HOST", "value": host.strip("[]")},
            {"name": "KUBERNETES_SERVICE_PORT", "value": port},
        ]
    if node:
        pod_spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    else:
        pod_spec["affinity"] = affinity
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(LABELS)},
            "template": {"metadata": {"labels": dict(LABELS)}, "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": SERVICE,
            "namespace": NAMESPACE,
            "labels": {**LABELS, "kubernetes.io/name": "CoreDNS"},
        },
        "spec": {
            "selector": dict(LABELS),
            "clusterIP": CLUSTER_IP,
            "ports": [
                {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "targetPort": "dns-tcp", "protocol": "TCP"},
            ],
        },
    }
    return [account, role, binding, config, deployment, service]


def _passwd() -> tuple[str, str]:
    passwd = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{UID}:{GID}:nonroot:/:/sbin/nologin\n"
    group = f"root:x:0:\nnonroot:x:{GID}:\n"
    return passwd, group


def image_config() -> ociimage.ImageConfig:
    return ociimage.ImageConfig(
        entrypoint=(BINARY,),
        cmd=("-conf", f"{COREFILE_DIR}/Corefile"),
        user=f"{UID}:{GID}",
        env=(),
        exposed_ports=(f"{DNS_PORT}/udp", f"{DNS_PORT}/tcp"),
    )


def image(binary: Path) -> Path:
    """The OCI image archive of ``IMAGE``: the static ``binary`` as ``/coredns`` (the
    entrypoint), ``/etc/passwd`` and ``/etc/group`` naming its user. Written once per binary
    into the cache beside the builds; `ctr -n k8s.io images import` reads it."""
    if not binary.is_file():
        raise ClusterDnsError(f"no CoreDNS binary at {binary}: build it with gobuild.coredns()")
    passwd, group = _passwd()
    key = hashlib.sha256()
    key.update(binary.read_bytes())
    key.update((passwd + group + repr(image_config())).encode())
    out = gobuild.cache_home() / "images" / f"coredns-{VERSION}-{key.hexdigest()[:12]}.tar"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".coredns-") as scratch:
        root = Path(scratch) / "root"
        (root / "etc").mkdir(parents=True)
        shutil.copyfile(binary, root / BINARY.lstrip("/"))
        (root / BINARY.lstrip("/")).chmod(0o755)
        for name, text in (("passwd", passwd), ("group", group)):
            (root / "etc" / name).write_text(text)
            (root / "etc" / name).chmod(0o644)
        (root / "etc").chmod(0o755)
        partial = Path(scratch) / "image.tar"
        ociimage.image_from_dir(IMAGE, root, image_config(), partial)
        os.replace(partial, out)
    return out


def install(
    control_plane: ControlPlane,
    import_image: Callable[[Path], object],
    *,
    node: str | None = None,
    apiserver: str | None = None,
    binary: Path | None = None,
    timeout: float = 120,
) -> None:
    """Install cluster DNS on ``control_plane``'s real node and wait until it serves.

    ``import_image(archive)`` puts the image archive into the node's runtime (for
    containerd: ``ctr -n k8s.io images import ARCHIVE``); the pods never pull it. Then the
    manifests are applied (server-side, so it can run again) and the Deployment is awaited
    Available: its pod passed the readiness probe, the kubernetes plugin has synced.
    ``node`` pins the pod to that node, ``apiserver`` (``HOST:PORT``) is where it reaches
    the API server (see ``manifests``); ``binary`` is CoreDNS (built if not given).
    """
    archive = image(binary or gobuild.coredns())
    import_image(archive)
    control_plane.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "-f",
        "-",
        input=yaml.safe_dump_all(manifests(node=node, apiserver=apiserver)),
    )
    waited = control_plane.kubectl(
        "wait",
        "--for=condition=Available",
        f"--timeout={timeout:.0f}s",
        "-n",
        NAMESPACE,
        f"deployment/{NAME}",
        check=False,
        timeout=timeout + 30,
    )
    if waited.returncode != 0:
        pods = control_plane.kubectl(
            "describe", "pods", "-n", NAMESPACE, "-l", "k8s-app=kube-dns", check=False
        ).stdout
        raise ClusterDnsError(
            f"deployment {NAMESPACE}/{NAME} was not Available within {timeout:.0f} s "
            f"({waited.stderr.strip()}); its pods:\n{pods[-3000:]}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phabmesh.dev.clusterdns image|manifests``: build CoreDNS and its image
    archive and print the archive's path, or print the manifests (YAML)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["image"]:
        print(image(gobuild.coredns()))
        return 0
    if args == ["manifests"]:
        print(yaml.safe_dump_all(manifests()), end="")
        return 0
    print("usage: python -m phabmesh.dev.clusterdns image|manifests", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
