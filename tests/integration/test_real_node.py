"""A real node beside the local control plane (phabmesh.dev.realnode): pods really run,
through containerd, with logs, exec, native sidecars, projected tokens, Services and the
``kubernetes`` Service; and stopping the node leaves nothing behind on the host.

Needs root and `make node-packages` (the fixture fails otherwise, with what is missing).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from phabmesh.dev import realnode
from tests.kube import wait_for
from tests.realnode import APICLIENT, RealCluster, jwt_claims, pod

AUDIENCE = "phabmesh-real-node-test"


@pytest.fixture
def ns(real_cluster: RealCluster) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount and kube-root-ca.crt exist."""
    name = f"rn-{uuid.uuid4().hex[:8]}"
    real_cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: (
            real_cluster.kubectl(
                "get",
                "-n",
                name,
                "serviceaccount/default",
                "configmap/kube-root-ca.crt",
                check=False,
            ).returncode
            == 0
        ),
        what=f"the default ServiceAccount and kube-root-ca.crt in {name}",
    )
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_a_pod_runs_on_the_real_node_with_logs_and_exec(real_cluster: RealCluster, ns: str) -> None:
    real_cluster.apply(pod("hello", "echo started as $(id -u); exec sleep 3600"), namespace=ns)
    real_cluster.wait_ready("hello", ns)

    status = real_cluster.pod("hello", ns)
    assert status["spec"]["nodeName"] == realnode.NODE_NAME
    assert status["status"]["podIP"].startswith("10.85.0.")
    assert real_cluster.logs("hello", namespace=ns).strip() == "started as 0"
    assert real_cluster.exec("hello", "sh", "-c", "echo $((6 * 7))", namespace=ns).strip() == "42"


def test_pods_go_to_the_real_node_unless_they_tolerate_the_kwok_taint(
    real_cluster: RealCluster, ns: str
) -> None:
    plain = pod("plain", "exec sleep 3600")
    del plain["spec"]["nodeSelector"]
    simulated = pod("simulated", "never runs", image="registry.invalid/nothing:1")
    simulated["spec"]["nodeSelector"] = {"type": "kwok"}
    simulated["spec"]["tolerations"] = [realnode.KWOK_TAINT | {"operator": "Equal"}]
    real_cluster.apply(plain, simulated, namespace=ns)
    real_cluster.wait_ready("plain", ns)
    real_cluster.wait_ready("simulated", ns)

    assert real_cluster.pod("plain", ns)["spec"]["nodeName"] == realnode.NODE_NAME
    assert real_cluster.pod("simulated", ns)["spec"]["nodeName"].startswith("kwok-node-")


def test_a_native_sidecars_startup_probe_gates_the_app(real_cluster: RealCluster, ns: str) -> None:
    spec = pod(
        "sidecar",
        'echo "sidecar said: $(cat /shared/ready)"; exec sleep 3600',
        volumes=[{"name": "shared", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
    )
    spec["spec"]["containers"][0]["volumeMounts"] = [{"name": "shared", "mountPath": "/shared"}]
    spec["spec"]["initContainers"] = [
        {
            "name": "proxy",
            "image": realnode.BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "restartPolicy": "Always",
            "command": ["/bin/sh", "-c", "sleep 2; echo ok > /shared/ready; exec sleep 3600"],
            "startupProbe": {
                "exec": {"command": ["test", "-f", "/shared/ready"]},
                "periodSeconds": 1,
                "failureThreshold": 30,
            },
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        }
    ]
    real_cluster.apply(spec, namespace=ns)
    real_cluster.wait_ready("sidecar", ns)

    # the app started only once the sidecar's file was there
    assert real_cluster.logs("sidecar", "main", ns).strip() == "sidecar said: ok"
    proxy = real_cluster.pod("sidecar", ns)["status"]["initContainerStatuses"][0]
    assert (proxy["started"], proxy["ready"]) == (True, True)


def test_a_projected_token_with_an_audience_is_readable_by_a_non_root_user(
    real_cluster: RealCluster, ns: str
) -> None:
    spec = pod(
        "tokens",
        "exec sleep 3600",
        securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
        volumes=[
            {
                "name": "tokens",
                "projected": {
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": AUDIENCE,
                                "expirationSeconds": 600,
                                "path": "token",
                            }
                        }
                    ]
                },
            }
        ],
    )
    spec["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "tokens", "mountPath": "/var/run/secrets/tokens", "readOnly": True}
    ]
    real_cluster.apply(spec, namespace=ns)
    real_cluster.wait_ready("tokens", ns)

    assert real_cluster.exec("tokens", "id", "-u", namespace=ns).strip() == "1000"
    token = real_cluster.exec("tokens", "cat", "/var/run/secrets/tokens/token", namespace=ns)
    claims = jwt_claims(token.strip())
    assert claims["aud"] == [AUDIENCE]
    assert claims["kubernetes.io"]["pod"]["name"] == "tokens"
    assert claims["kubernetes.io"]["node"]["name"] == realnode.NODE_NAME
    spec = client.V1TokenReviewSpec(token=token.strip(), audiences=[AUDIENCE])
    review = client.AuthenticationV1Api(real_cluster.api).create_token_review(
        client.V1TokenReview(spec=spec)
    )
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{ns}:default"


def test_a_pod_reaches_the_kubernetes_service_with_its_own_token(
    real_cluster: RealCluster, ns: str
) -> None:
    # an in-cluster client: KUBERNETES_SERVICE_HOST/PORT from the kubelet, the automounted
    # token and ca.crt, the server certificate verified (tests/images/apiclient.go)
    spec = pod("apiclient", "", image=APICLIENT, restartPolicy="Never")
    del spec["spec"]["containers"][0]["command"]
    real_cluster.apply(spec, namespace=ns)
    assert real_cluster.wait_phase("apiclient", {"Succeeded", "Failed"}, ns) == "Succeeded", (
        real_cluster.logs("apiclient", namespace=ns)
    )

    status, _, body = real_cluster.logs("apiclient", namespace=ns).partition(" {")
    assert status == "HTTP 201"
    user = json.loads("{" + body)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{ns}:default"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["apiclient"]


def test_the_host_reaches_the_kubernetes_service_too(real_cluster: RealCluster) -> None:
    pki = real_cluster.plane.pki
    context = ssl.create_default_context(cafile=str(pki.ca_cert))  # SAN 10.96.0.1
    context.load_cert_chain(*(str(path) for path in pki.pair("admin")))
    url = f"https://{realnode.KUBERNETES_SERVICE_IP}/readyz"
    with urllib.request.urlopen(url, context=context, timeout=10) as answer:
        assert answer.status == 200


def test_nothing_is_forwarded_off_the_bridge(real_cluster: RealCluster) -> None:
    """Pods have no default route; one a pod adds itself leads nowhere: the host forwards
    nothing from the bridge to another interface (it forwards on the bridge: Services)."""
    rules = subprocess.run(
        ["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    drop = f"-A FORWARD -i {realnode.BRIDGE} ! -o {realnode.BRIDGE} -m comment --comment "
    assert any(r.startswith(drop) and r.endswith("-j DROP") for r in rules), rules


def test_a_pod_that_routes_loopback_to_the_node_reaches_no_loopback_port(
    real_cluster: RealCluster, ns: str
) -> None:
    """route_localnet is on for the DNAT to the API server; the node's own rule (not only the
    kubelet's KUBE-FIREWALL) keeps every other 127.0.0.1 port (etcd's) out of pods' reach."""
    spec = pod("router", "exec sleep 3600")
    spec["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    real_cluster.apply(spec, namespace=ns)
    real_cluster.wait_ready("router", ns)
    real_cluster.exec(
        "router",
        "sh",
        "-c",
        "ip route del local 127.0.0.0/8 dev lo table local && ip addr del 127.0.0.1/8 dev lo"
        " && sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1"
        f" && ip route add 127.0.0.0/8 via {realnode.NODE_IP} dev eth0",
        namespace=ns,
    )
    probe = f"echo | nc -w 3 127.0.0.1 {real_cluster.plane.etcd_port} >/dev/null; echo $?"
    kubelet_rule = ["INPUT", "-j", "KUBE-FIREWALL"]
    subprocess.run(["iptables", "-w", "-D", *kubelet_rule], check=False, capture_output=True)
    try:
        assert real_cluster.exec("router", "sh", "-c", probe, namespace=ns).strip() != "0"
    finally:
        if subprocess.run(["iptables", "-w", "-C", *kubelet_rule], check=False).returncode:
            subprocess.run(["iptables", "-w", "-I", *kubelet_rule], check=True)
    # the way in that is meant to be there still works
    to_service = f"echo | nc -w 3 {realnode.KUBERNETES_SERVICE_IP} 443 >/dev/null; echo $?"
    assert real_cluster.exec("router", "sh", "-c", to_service, namespace=ns).strip() == "0"


def _http_get(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer.decode().splitlines()[-1]


def test_a_cluster_ip_service_is_reached_from_a_pod_and_from_the_host(
    real_cluster: RealCluster, ns: str
) -> None:
    serve = "mkdir /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"
    web = pod("web", serve)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    real_cluster.apply(web, service, pod("client", "exec sleep 3600"), namespace=ns)
    real_cluster.wait_ready("web", ns)
    real_cluster.wait_ready("client", ns)
    ip = real_cluster.kubectl("get", "service", "-n", ns, "web", "-o", "jsonpath={.spec.clusterIP}")
    cluster_ip = ip.stdout.strip()
    assert cluster_ip.startswith("10.96.")

    def from_pod() -> str:
        command = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80 | tail -1"
        result = real_cluster.kubectl("exec", "-n", ns, "client", "--", "sh", "-c", command)
        return result.stdout.strip()

    # kube-proxy writes the Service's rules once it sees the endpoint: poll until then
    assert wait_for(from_pod, timeout=30, interval=0.5, what="the Service from a pod")
    assert from_pod() == "hello-from-web"
    assert _http_get(cluster_ip, 80) == "hello-from-web"


def test_cluster_dns_answers_a_services_name_from_a_pod(real_cluster: RealCluster, ns: str) -> None:
    """CoreDNS (phabmesh.dev.clusterdns) runs on the node as kube-system/kube-dns, the
    kubelet's clusterDNS: a pod resolves a Service's name to its ClusterIP, and its
    resolv.conf searches the pod's namespace."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "named"},
        "spec": {"selector": {"app": "nothing"}, "ports": [{"port": 80}]},
    }
    real_cluster.apply(service, pod("resolver", "exec sleep 3600"), namespace=ns)
    real_cluster.wait_ready("resolver", ns)
    ip = real_cluster.kubectl(
        "get", "service", "-n", ns, "named", "-o", "jsonpath={.spec.clusterIP}"
    )
    resolv = real_cluster.exec("resolver", "cat", "/etc/resolv.conf", namespace=ns)
    assert "nameserver 10.96.0.10" in resolv
    assert f"search {ns}.svc.cluster.local" in resolv
    # (busybox's nslookup does not apply the search list: the full name)
    answer = real_cluster.exec(
        "resolver", "nslookup", f"named.{ns}.svc.cluster.local", namespace=ns
    )
    assert ip.stdout.strip() in answer, answer


def test_graceful_deletion_stops_the_app_then_its_sidecar(
    real_cluster: RealCluster, ns: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = pod(
        "graceful",
        "trap 'echo app TERM >> /out/log; sleep 2; echo app done >> /out/log; exit 0' TERM; "
        "while true; do sleep 1; done",
        grace=20,
        volumes=[{"name": "out", "hostPath": {"path": str(out), "type": "Directory"}}],
    )
    spec["spec"]["containers"][0]["volumeMounts"] = [{"name": "out", "mountPath": "/out"}]
    spec["spec"]["initContainers"] = [
        {
            "name": "proxy",
            "image": realnode.BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "restartPolicy": "Always",
            "command": [
                "/bin/sh",
                "-c",
                "trap 'echo sidecar TERM >> /out/log; exit 0' TERM; while true; do sleep 1; done",
            ],
            "volumeMounts": [{"name": "out", "mountPath": "/out"}],
        }
    ]
    real_cluster.apply(spec, namespace=ns)
    real_cluster.wait_ready("graceful", ns)

    real_cluster.kubectl("delete", "pod", "-n", ns, "graceful", "--wait=true", "--timeout=60s")

    assert (out / "log").read_text().splitlines() == ["app TERM", "app done", "sidecar TERM"]
    gone = real_cluster.kubectl("get", "pod", "-n", ns, "graceful", check=False)
    assert "NotFound" in gone.stderr


def test_stopping_leaves_nothing_and_a_crashed_runs_leftovers_are_cleaned(
    real_cluster: RealCluster, ns: str
) -> None:
    """Last in this file: it stops and restarts the session's node."""
    node = real_cluster.node
    real_cluster.apply(pod("before", "exec sleep 3600"), namespace=ns)
    real_cluster.wait_ready("before", ns)
    old = dict(node._procs)
    assert set(old) == {"containerd", "kubelet", "kube-proxy"}

    # A crash: the process that ran the node goes away without stopping it; its processes,
    # mounts, cgroups, bridge, rules and state file stay behind. The next start cleans them.
    node._procs.clear()
    assert node._lock is not None
    node._lock.close()
    node._lock = None
    node.start()
    for proc in old.values():
        proc.wait(timeout=10)  # killed by the start
    real_cluster.apply(pod("after", "exec sleep 3600"), namespace=ns)
    real_cluster.wait_ready("after", ns)

    sysctls = dict(node._state["sysctls"])
    assert "net/ipv4/ip_forward" in sysctls  # the bridge plugin turns it on
    node.stop()
    assert realnode.leftovers(node.root) == []
    assert {name: Path("/proc/sys", name).read_text().strip() for name in sysctls} == sysctls

    node.start()  # for the tests of the session after this one
    assert node.ready()
