"""Cluster DNS (phabmesh.dev.clusterdns): CoreDNS built from its Go module, run as a host
process with the Corefile and RBAC of its manifests, against the session's control plane.

The server listens on 127.0.0.1 only and talks to the API server as the ServiceAccount the
manifests bind to their ClusterRole (a kubeconfig with its token), so a grant missing from
the ClusterRole keeps it from syncing. The queries are built and read here, byte by byte.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from phabmesh.dev import clusterdns, gobuild
from tests.kube import Cluster, wait_for

A, PTR = 1, 12
NOERROR, NXDOMAIN, REFUSED = 0, 3, 5
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
# The plugins the build registers: the Corefile's, and what the kubernetes plugin imports.
PLUGINS = {
    "bind",
    "cache",
    "errors",
    "health",
    "kubernetes",
    "metadata",
    "prometheus",
    "ready",
    "transfer",
}


# -- a small DNS client -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    rcode: int
    authoritative: bool
    records: list[tuple[int, bytes | str]]  # (type, address for A, name for PTR, else rdata)


def encode_name(name: str) -> bytes:
    labels = [label.encode() for label in name.rstrip(".").split(".")]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def read_name(message: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    end = -1
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = offset + 2
            offset = struct.unpack("!H", message[offset : offset + 2])[0] & 0x3FFF
            continue
        if length == 0:
            offset += 1
            break
        labels.append(message[offset + 1 : offset + 1 + length].decode())
        offset += 1 + length
    return ".".join(labels) + ".", end if end >= 0 else offset


def build_query(name: str, qtype: int) -> tuple[int, bytes]:
    qid = random.randrange(1 << 16)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired, 1 question
    return qid, header + encode_name(name) + struct.pack("!HH", qtype, 1)


def parse(message: bytes, qid: int) -> Answer:
    rid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", message[:12])
    assert rid == qid, "the answer is for another query"
    assert flags & 0x8000, "not a response"
    offset = 12
    for _ in range(qdcount):
        _, offset = read_name(message, offset)
        offset += 4
    records: list[tuple[int, bytes | str]] = []
    for _ in range(ancount):
        _, offset = read_name(message, offset)
        rtype, _, _, length = struct.unpack("!HHIH", message[offset : offset + 10])
        offset += 10
        rdata = message[offset : offset + length]
        if rtype == A:
            records.append((rtype, str(ipaddress.IPv4Address(rdata))))
        elif rtype == PTR:
            records.append((rtype, read_name(message, offset)[0]))
        else:
            records.append((rtype, rdata))
        offset += length
    return Answer(flags & 0xF, bool(flags & 0x0400), records)


def query_udp(port: int, name: str, qtype: int = A) -> Answer:
    qid, message = build_query(name, qtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.send(message)
        return parse(sock.recv(4096), qid)


def query_tcp(port: int, name: str, qtype: int = A) -> Answer:
    qid, message = build_query(name, qtype)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!H", len(message)) + message)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the connection before answering"
            data += chunk
        return parse(data[2:], qid)


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer + "."


# -- the server as a host process ---------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - a local URL
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def rbac_docs() -> list[dict[str, Any]]:
    return [doc for doc in clusterdns.manifests() if doc["kind"] in RBAC_KINDS]


@pytest.fixture(scope="module")
def binary() -> Path:
    return gobuild.coredns()


@pytest.fixture(scope="module")
def coredns(
    cluster: Cluster, binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """CoreDNS with the manifests' Corefile, as their ServiceAccount, on 127.0.0.1."""
    workdir = tmp_path_factory.mktemp("coredns")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac_docs()))
    kubeconfig = cluster.plane.service_account_kubeconfig(clusterdns.NAMESPACE, clusterdns.NAME)
    context = yaml.safe_load(kubeconfig.read_text())["contexts"][0]["name"]
    port, health, ready = free_port(), free_port(), free_port()
    corefile = workdir / "Corefile"
    corefile.write_text(
        clusterdns.corefile(
            port=port,
            health_port=health,
            ready_port=ready,
            bind="127.0.0.1",
            kubeconfig=kubeconfig,
            context=context,
        )
    )
    log = workdir / "coredns.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "-conf", str(corefile)],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(proc, port, log)
    try:

        def ready_or_exited() -> bool:
            assert proc.poll() is None, f"CoreDNS exited:\n{server.output()}"
            return http_ok(f"http://127.0.0.1:{ready}/ready")

        try:
            wait_for(ready_or_exited, timeout=60, interval=0.2, what="CoreDNS to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{server.output()[-3000:]}") from None
        assert http_ok(f"http://127.0.0.1:{health}/health")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "forbidden" not in server.output().lower(), server.output()


def create_service(cluster: Cluster, namespace: str, name: str) -> str:
    service = cluster.core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(
                selector={"app": name}, ports=[client.V1ServicePort(port=8443)]
            ),
        ),
    )
    return str(service.spec.cluster_ip)


# -- the build ----------------------------------------------------------------------------------


def test_the_build_has_the_pinned_version_and_no_plugin_that_forwards(binary: Path) -> None:
    mod = gobuild.module_dir() / "coredns" / "go.mod"
    assert gobuild.required_version(mod, gobuild.COREDNS_MODULE) == clusterdns.VERSION
    version = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True)
    assert f"CoreDNS-{clusterdns.VERSION.lstrip('v')}" in version.stdout
    listed = subprocess.run([binary, "-plugins"], capture_output=True, text=True, check=True)
    assert set(listed.stdout.split()) == PLUGINS


def test_a_corefile_that_names_an_upstream_does_not_start(binary: Path, tmp_path: Path) -> None:
    """Directives follow CoreDNS's own order list, and one whose plugin was left out of the
    build is refused when the Corefile is loaded: this build cannot be made to forward."""
    port = free_port()
    corefile = tmp_path / "Corefile"
    corefile.write_text(f".:{port} {{\n    bind 127.0.0.1\n    forward . 192.0.2.1\n}}\n")
    result = subprocess.run(
        [binary, "-conf", str(corefile)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "no action found for directive 'forward'" in result.stderr


# -- the server ---------------------------------------------------------------------------------


def test_a_service_name_answers_its_cluster_ip_over_udp_and_tcp(
    cluster: Cluster, coredns: Server, namespace: str
) -> None:
    cluster_ip = create_service(cluster, namespace, "issuer")
    name = f"issuer.{namespace}.svc.cluster.local"

    def answered() -> Answer | None:
        answer = query_udp(coredns.port, name)
        return answer if answer.rcode == NOERROR and answer.records else None

    answer = wait_for(answered, timeout=30, interval=0.5, what=f"an A record for {name}")
    assert answer.records == [(A, cluster_ip)]
    assert answer.authoritative
    assert query_tcp(coredns.port, name).records == [(A, cluster_ip)]
    # The reverse zone of the Service range names the Service.
    reverse = query_udp(coredns.port, reverse_name(cluster_ip), PTR)
    assert (reverse.rcode, reverse.records) == (NOERROR, [(PTR, name + ".")])


def test_unknown_names_in_the_zones_are_nxdomain(coredns: Server, namespace: str) -> None:
    for name, qtype in (
        (f"missing.{namespace}.svc.cluster.local", A),
        ("missing.no-such-namespace.svc.cluster.local", A),
        ("no-such-name.cluster.local", A),
        (reverse_name("10.96.200.200"), PTR),
        (reverse_name("10.85.0.250"), PTR),
    ):
        for query in (query_udp, query_tcp):
            answer = query(coredns.port, name, qtype)
            assert (answer.rcode, answer.records) == (NXDOMAIN, []), (name, query.__name__)


def socket_addresses(pid: int) -> list[tuple[str, str, str]]:
    """(protocol, local address, remote address) of every socket process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])

    def address(text: str) -> str:
        host, port = text.split(":")
        raw = bytes.fromhex(host)
        if len(raw) == 4:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
        else:
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            ip = ipaddress.IPv6Address(words)
        return f"{ip}:{int(port, 16)}"

    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                found.append((proto, address(fields[1]), address(fields[2])))
    return found


def on_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def test_names_outside_the_zones_are_refused_without_an_upstream(
    coredns: Server, cluster: Cluster
) -> None:
    for name, qtype in (
        ("example.com", A),
        ("phabmesh-endpoint.phabmesh-system.svc", A),  # only with a search domain appended
        (reverse_name("192.0.2.1"), PTR),
        (reverse_name("10.97.0.1"), PTR),  # outside the Service range
    ):
        for query in (query_udp, query_tcp):
            answer = query(coredns.port, name, qtype)
            assert (answer.rcode, answer.records) == (REFUSED, []), (name, query.__name__)
    # Nothing was sent anywhere: the server's only sockets are its listeners and its
    # connections to the API server, all on loopback.
    sockets = socket_addresses(coredns.proc.pid)
    apiserver = f"127.0.0.1:{cluster.plane.apiserver_port}"
    assert any(remote == apiserver for _, _, remote in sockets), sockets
    off = [s for s in sockets if not (on_loopback(s[1]) and on_loopback(s[2]))]
    assert off == [], f"sockets off loopback: {off}"


def test_the_service_account_may_read_only_what_the_plugin_watches(cluster: Cluster) -> None:
    who = f"--as=system:serviceaccount:{clusterdns.NAMESPACE}:{clusterdns.NAME}"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac_docs()))
    for verb, resource, allowed in (
        ("watch", "services", True),
        ("list", "endpointslices.discovery.k8s.io", True),
        ("watch", "namespaces", True),
        ("list", "pods", False),  # pods disabled: no pod records, no pod informer
        ("list", "secrets", False),
        ("list", "endpoints", False),
        ("create", "services", False),
    ):
        result = cluster.kubectl("auth", "can-i", verb, resource, "-A", who, check=False)
        assert result.stdout.strip() == ("yes" if allowed else "no"), (verb, resource)


# -- install() --------------------------------------------------------------------


def test_install_imports_the_image_applies_the_manifests_and_waits_until_available(
    cluster: Cluster, binary: Path
) -> None:
    """On the session's control plane the pod is pinned to a simulated node, which reports
    it Ready without running it: install's steps, not the server (tested above)."""
    imported: list[Path] = []
    node = cluster.plane.nodes[0]
    try:
        clusterdns.install(cluster.plane, imported.append, node=node, binary=binary, timeout=60)
        assert imported == [clusterdns.image(binary)]
        service = cluster.core.read_namespaced_service(clusterdns.SERVICE, clusterdns.NAMESPACE)
        assert service.spec.cluster_ip == clusterdns.CLUSTER_IP
        (pod,) = cluster.core.list_namespaced_pod(
            clusterdns.NAMESPACE, label_selector="k8s-app=kube-dns"
        ).items
        assert pod.spec.node_name == node
        assert pod.spec.containers[0].image == clusterdns.IMAGE
        # Again: the same objects, server-side applied, change nothing and wait no longer.
        clusterdns.install(cluster.plane, imported.append, node=node, binary=binary, timeout=60)
    finally:
        for kind, name in (
            ("deployment", clusterdns.NAME),
            ("service", clusterdns.SERVICE),
            ("configmap", clusterdns.NAME),
        ):
            cluster.kubectl(
                "delete", kind, name, "-n", clusterdns.NAMESPACE, "--ignore-not-found", check=False
            )
