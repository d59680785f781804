"""Cluster DNS's manifests, Corefile and image (phabmesh.dev.clusterdns); the server itself
runs in tests/integration/test_cluster_dns.py."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from phabmesh.dev import clusterdns


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), "one object per kind"
    return kinds


def test_the_service_is_kube_dns_at_the_kubelets_cluster_dns_address() -> None:
    service = by_kind(clusterdns.manifests())["Service"]
    assert (service["metadata"]["namespace"], service["metadata"]["name"]) == (
        "kube-system",
        "kube-dns",
    )
    assert service["spec"]["clusterIP"] == "10.96.0.10"
    ports = {(p["port"], p["protocol"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {(53, "UDP", "dns"), (53, "TCP", "dns-tcp")}
    deployment = by_kind(clusterdns.manifests())["Deployment"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {(p["name"], p["protocol"]): p["containerPort"] for p in container["ports"]}
    # Service port 53 reaches the unprivileged port the server listens on.
    assert named[("dns", "UDP")] == named[("dns-tcp", "TCP")] == 1053
    assert ":1053 " in clusterdns.corefile().splitlines()[0] + " "


def test_the_pod_runs_as_nonroot_read_only_without_capabilities() -> None:
    deployment = by_kind(clusterdns.manifests())["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == clusterdns.UID != 0
    assert spec["serviceAccountName"] == clusterdns.NAME
    assert spec["dnsPolicy"] == "Default"
    (container,) = spec["containers"]
    assert container["image"] == "localhost/coredns:v1.15.0"
    assert container["imagePullPolicy"] == "Never"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], ports[probe["port"]]) == ("/ready", clusterdns.READY_PORT)
    assert f"ready :{clusterdns.READY_PORT}" in clusterdns.corefile()


def test_the_pod_is_kept_off_simulated_nodes_or_pinned_to_the_node_named() -> None:
    spec = by_kind(clusterdns.manifests())["Deployment"]["spec"]["template"]["spec"]
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [{"key": "type", "operator": "NotIn", "values": ["kwok"]}]
    assert "nodeSelector" not in spec
    pinned = by_kind(clusterdns.manifests(node="vm"))["Deployment"]["spec"]["template"]["spec"]
    assert pinned["nodeSelector"] == {"kubernetes.io/hostname": "vm"}
    assert "affinity" not in pinned


def test_the_role_grants_what_the_kubernetes_plugin_watches_and_nothing_else() -> None:
    kinds = by_kind(clusterdns.manifests())
    granted = {
        (group, resource, verb)
        for rule in kinds["ClusterRole"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        (group, resource, verb)
        for group, resource in (
            ("", "services"),
            ("", "namespaces"),
            ("discovery.k8s.io", "endpointslices"),
        )
        for verb in ("list", "watch")
    }
    (subject,) = kinds["ClusterRoleBinding"]["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}
    assert (
        kinds["ClusterRoleBinding"]["roleRef"]["name"] == kinds["ClusterRole"]["metadata"]["name"]
    )
    assert "pods disabled" in clusterdns.corefile()  # so no pod list/watch is needed


def test_the_corefile_serves_the_cluster_zones_and_has_no_upstream() -> None:
    corefile = by_kind(clusterdns.manifests())["ConfigMap"]["data"]["Corefile"]
    assert corefile == clusterdns.corefile()
    assert corefile.splitlines()[0] == ("cluster.local:1053 10.96.0.0/16:1053 10.85.0.0/24:1053 {")
    directives = {line.split()[0] for line in corefile.splitlines()[1:] if line.strip() != "}"}
    assert directives == {"errors", "health", "ready", "kubernetes", "pods", "cache"}
    assert "bind" not in corefile and "kubeconfig" not in corefile  # every interface, in-cluster
    host = clusterdns.corefile(
        port=5353, bind="127.0.0.1", kubeconfig=Path("/k/config"), context="dev"
    )
    assert "    bind 127.0.0.1\n" in host
    assert "        kubeconfig /k/config dev\n" in host
    assert "health 127.0.0.1:8080" in host and ":5353 " in host


def test_the_image_is_the_binary_as_a_nonroot_entrypoint_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    binary = tmp_path / "coredns"
    binary.write_bytes(b"\x7fELF not really")
    archive = clusterdns.image(binary)
    assert clusterdns.image(binary) == archive
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/coredns:v1.15.0"
    manifest = json.loads(files["blobs/sha256/" + entry["digest"][7:]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"][7:]])["config"]
    assert config["Entrypoint"] == ["/coredns"]
    assert config["User"] == "65532:65532"
    (layer,) = manifest["layers"]
    plain = gzip.decompress(files["blobs/sha256/" + layer["digest"][7:]])
    with tarfile.open(fileobj=io.BytesIO(plain)) as rootfs:
        members = {m.name: m for m in rootfs}
        assert (members["coredns"].mode, members["coredns"].uid) == (0o755, 0)
        passwd = rootfs.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = rootfs.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert "nonroot:x:65532:65532:" in passwd and "nonroot:x:65532:" in group
    binary.write_bytes(b"\x7fELF another build")
    assert clusterdns.image(binary) != archive  # a new binary is a new image


def test_a_missing_binary_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(clusterdns.ClusterDnsError, match=r"gobuild\.coredns\(\)"):
        clusterdns.image(tmp_path / "coredns")


def test_the_api_server_address_can_be_given_and_is_checked() -> None:
    spec = by_kind(clusterdns.manifests())["Deployment"]["spec"]["template"]["spec"]
    assert "env" not in spec["containers"][0]  # the kubelet's KUBERNETES_SERVICE_* apply
    given = by_kind(clusterdns.manifests(apiserver="10.85.0.1:6443"))["Deployment"]
    (container,) = given["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "10.85.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
    ]
    ipv6 = by_kind(clusterdns.manifests(apiserver="[fd00::1]:6443"))["Deployment"]
    assert ipv6["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == "fd00::1"
    for wrong in ("10.85.0.1", "10.85.0.1:https", ":6443"):
        with pytest.raises(clusterdns.ClusterDnsError, match="apiserver must be HOST:PORT"):
            clusterdns.manifests(apiserver=wrong)
