"""The real node's pure parts: what it refuses to start without, its certificates, its network
config, and its build's cache key (the control plane's own build is not invalidated)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from phabmesh.dev import devcluster, gobuild, realnode
from phabmesh.dev.pki import Pki


def test_not_root_is_one_line_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 1000)
    with pytest.raises(realnode.NodeError, match="needs root") as raised:
        realnode.check_host()
    assert "\n" not in str(raised.value)


def test_missing_packages_are_named_with_the_make_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 0)
    found = shutil.which
    monkeypatch.setattr(
        realnode.shutil,
        "which",
        lambda cmd: None if cmd in ("conntrack", "runc") else found(cmd) or "/usr/bin/" + cmd,
    )
    monkeypatch.setattr(realnode, "cni_bin_dir", lambda: None)
    with pytest.raises(realnode.NodeError) as raised:
        realnode.check_host()
    message = str(raised.value)
    assert "conntrack containernetworking-plugins runc" in message
    assert "make node-packages" in message
    assert "\n" not in message


def test_a_control_plane_with_a_real_node_refuses_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 1000)
    binaries = gobuild.Binaries(*(tmp_path / name for name in "abcdef"))
    plane = devcluster.ControlPlane(tmp_path / "cp", binaries, real_node=True)
    with pytest.raises(realnode.NodeError, match="needs root"):
        plane.start()
    assert plane._procs == {}


def _subject(pki: Pki, leaf: str) -> tuple[str, list[str]]:
    cert = x509.load_pem_x509_certificate(pki.pair(leaf)[0].read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(cn), [str(o.value) for o in orgs]


def _sans(pki: Pki, leaf: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(pki.pair(leaf)[0].read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def test_the_pki_has_the_node_leaves_only_when_asked(tmp_path: Path) -> None:
    plain = Pki.create(tmp_path / "plain")
    assert not plain.pair("kubelet-client")[0].exists()
    assert {"10.96.0.1", "kubernetes.default.svc"} <= _sans(plain, "apiserver")

    pki = Pki.create(tmp_path / "node", node=("n1", "10.85.0.1"))
    assert _subject(pki, "kubelet-client") == ("system:node:n1", ["system:nodes"])
    assert _subject(pki, "kube-proxy") == ("system:kube-proxy", [])
    assert _subject(pki, "apiserver-kubelet-client")[1] == ["system:masters"]
    assert _sans(pki, "kubelet-serving") == {"10.85.0.1", "n1"}


class _Plane:
    """What RealNode reads of its control plane to render its config."""

    def __init__(self, root: Path) -> None:
        self.pki = Pki(root)


def test_pods_get_a_route_to_services_and_no_default_route(tmp_path: Path) -> None:
    node = realnode.RealNode(_Plane(tmp_path / "pki"), tmp_path / "node")  # type: ignore[arg-type]
    (node.root / "cni" / "net.d").mkdir(parents=True)
    node._render_cni()
    (conflist,) = (node.root / "cni" / "net.d").iterdir()
    bridge: dict[str, Any] = json.loads(conflist.read_text())["plugins"][0]
    assert (bridge["bridge"], bridge["ipMasq"]) == (realnode.BRIDGE, False)
    assert bridge["ipam"]["routes"] == [{"dst": devcluster.SERVICE_CIDR, "gw": realnode.NODE_IP}]
    config = node.kubelet_config()
    assert (config["address"], config["clusterDNS"]) == (realnode.NODE_IP, ["10.96.0.10"])
    assert config["healthzBindAddress"] == "127.0.0.1"


def test_pinning_the_node_modules_in_go_sum_keeps_the_control_planes_cache_key(
    tmp_path: Path,
) -> None:
    mod = tmp_path / "controlplane"
    mod.mkdir()
    (mod / "go.mod").write_text("module phabmesh.io/controlplane\n")
    (mod / "tools.go").write_text('package controlplane\n\nimport _ "k8s.io/kubernetes/cmd/x"\n')
    (mod / "node_tools.go").write_text(
        'package controlplane\n\nimport _ "k8s.io/kubernetes/cmd/y"\n'
    )
    shared = "k8s.io/api v0.36.3 h1:abc=\n"
    (mod / "go.sum").write_text(shared)
    before = gobuild.module_key(mod, sum_skip=gobuild.NODE_ONLY_MODULES)
    node_before = gobuild.module_key(mod, "node_tools.go")

    (mod / "go.sum").write_text(shared + "k8s.io/cri-streaming v0.36.3 h1:def=\n")

    assert gobuild.module_key(mod, sum_skip=gobuild.NODE_ONLY_MODULES) == before
    assert gobuild.module_key(mod, "node_tools.go") != node_before
    (mod / "go.sum").write_text(shared + "k8s.io/other v1.0.0 h1:ghi=\n")
    assert gobuild.module_key(mod, sum_skip=gobuild.NODE_ONLY_MODULES) != before


def test_the_kubelet_and_kube_proxy_are_what_node_tools_go_pins() -> None:
    tools = gobuild.module_dir() / "node_tools.go"
    assert gobuild.commands(tools) == [
        "k8s.io/kubernetes/cmd/kube-proxy",
        "k8s.io/kubernetes/cmd/kubelet",
    ]


class Interrupted(Exception):
    """What SIGINT raises in the test below (not KeyboardInterrupt, which ends pytest)."""


def test_a_second_interrupt_does_not_cut_the_stop_short(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ctrl-C twice in `phabmesh dev-cluster --real-node`: the second one came while the node
    was stopping, and left its kubelet, containerd, bridge and rules behind."""
    monkeypatch.setattr(realnode, "STATE_DIR", tmp_path / "run")
    realnode.STATE_DIR.mkdir()
    plane = _Plane(tmp_path / "pki")
    node = realnode.RealNode(plane, tmp_path / "node")  # type: ignore[arg-type]
    node._lock = (realnode.STATE_DIR / "lock").open("a+")
    plane.running = lambda name: True  # type: ignore[attr-defined]
    plane.kubectl = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    monkeypatch.setattr(node, "running", lambda name: name == "kubelet")
    cleaned: list[list[Path]] = []
    monkeypatch.setattr(realnode, "clean_host", lambda dirs, state: cleaned.append(list(dirs)))

    def deleting_pods() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        time.sleep(0.1)

    monkeypatch.setattr(node, "_delete_pods", deleting_pods)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        node.stop()
    finally:
        signal.signal(signal.SIGINT, previous)

    assert cleaned == [[node.root]]
    assert not (realnode.STATE_DIR / "lock").exists()
