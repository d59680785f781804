"""Each process's /metrics, scraped over HTTP after a scenario, reads what happened.

The session's operator and gateway run in threads of this interpreter; each records into its
own registry (phabmesh.metrics), so each /metrics shows that process's series only. They are
shared with other tests, so counters are compared before and after; gauges of this test's own
objects are read as they are.
"""

from __future__ import annotations

import base64
import datetime
import time

import requests
from cryptography import x509
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from phabmesh import credentials, resources
from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    active_leases,
    binding_condition,
    bot_ready,
    exchange,
    label_namespace,
    make_binding,
    make_bot,
    make_pod,
    pod_token,
)
from tests.stack import Threaded

G, V = resources.GROUP, resources.VERSION
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(process: Threaded) -> Samples:
    """Every sample of the process's /metrics, as Prometheus would read it."""
    port = process.process.metrics_port  # type: ignore[attr-defined]
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """The series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and wanted <= key}


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def gateway_call(gateway: Threaded, method: str, token: str | None) -> dict[str, object]:
    port = gateway.process.port  # type: ignore[attr-defined]
    data = {"api.token": token, "output": "json"} if token else {"output": "json"}
    answer = requests.post(f"http://127.0.0.1:{port}/api/{method}", data=data, timeout=10)
    body: dict[str, object] = answer.json()
    return body


def create_bot(cluster: Cluster, name: str, secret: str) -> None:
    cluster.custom.create_cluster_custom_object(
        G,
        V,
        resources.BOT_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.BOT_KIND,
            "metadata": {"name": name},
            "spec": {
                "username": name,
                "tokenSecretRef": {"name": secret},
                "namespaceSelector": {"matchLabels": {"phabmesh.io/bots": "allowed"}},
            },
        },
    )


def delete_bot(cluster: Cluster, name: str) -> None:
    cluster.custom.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, name)


def reason_of(cluster: Cluster, bot: str) -> str | None:
    condition = bot_ready(cluster, bot)
    return str(condition["reason"]) if condition else None


def test_each_metric_reads_what_happened(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, namespace: str
) -> None:
    op_before, gw_before = scrape(operator), scrape(gateway)
    started = time.time()

    # -- a bot, a binding, a pod: a lease is issued -----------------------------------------
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot, credentialTTL="2m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    pod = make_pod(cluster, namespace, "runner-1")
    wait_for(lambda: active_leases(cluster, namespace), what="the lease")
    token = pod_token(cluster, namespace, pod)

    # -- the credential endpoint: one credential, three refusals ------------------------------
    issued = exchange(operator, token)
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    assert exchange(operator, "junk").status_code == 401
    assert exchange(operator, token, format="bogus").status_code == 400
    assert exchange(operator, token, binding="nope").status_code == 403

    # -- the gateway: one call forwarded, two refused ----------------------------------------
    def gateway_knows() -> bool:
        leases = gateway.process.state.leases.by_uid  # type: ignore[attr-defined]
        return any(lease.namespace == namespace for lease in leases.values())

    wait_for(gateway_knows, what="the gateway to see the lease")
    assert gateway_call(gateway, "user.whoami", credential)["error_code"] is None
    assert gateway_call(gateway, "user.whoami", None)["error_code"] == "ERR-INVALID-SESSION"
    assert gateway_call(gateway, "maniphest.edit", credential)["error_code"] == "ERR-CONDUIT-CORE"

    op, gw = scrape(operator), scrape(gateway)
    # Each process shows its own metrics only.
    assert "phabmesh_leases_issued_total" in names(op)
    assert not {n for n in names(op) if n.startswith("phabmesh_gateway_")}
    assert "phabmesh_gateway_requests_total" in names(gw)
    assert not names(gw) & {
        "phabmesh_leases_issued_total",
        "phabmesh_operator_acting",
        "phabmesh_leases_active",
        "phabmesh_credential_refusals_total",
    }

    def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The controller (other tests' objects keep it busy too: at least this test's events).
    assert moved(op, op_before, "phabmesh_leases_issued_total") >= 1
    assert moved(op, op_before, "phabmesh_controller_work_handled_total", kind="pod") >= 1
    assert moved(op, op_before, "phabmesh_controller_work_handled_total", kind="bot") >= 1
    assert "phabmesh_controller_work_waiting" in names(op)
    assert moved(op, op_before, "phabmesh_bot_checks_total", result="Ready") >= 1
    assert series(op, "phabmesh_bot_ready", bot=bot) == {
        frozenset({("bot", bot), ("reason", "Verified")}): 1.0
    }
    assert series(op, "phabmesh_binding_ready", namespace=namespace) == {
        frozenset({("namespace", namespace), ("binding", "runners"), ("reason", "Ready")}): 1.0
    }
    assert value(op, "phabmesh_leases_active", namespace=namespace, binding="runners") == 1.0
    assert value(op, "phabmesh_operator_acting") == 1.0
    # The credential endpoint: exactly this test's requests.
    assert moved(op, op_before, "phabmesh_credential_requests_total", outcome="issued") == 1
    for reason in ("invalid_token", "invalid_format", "no_lease"):
        assert moved(op, op_before, "phabmesh_credential_refusals_total", reason=reason) == 1
    # The gateway: exactly this test's calls.
    assert (
        moved(gw, gw_before, "phabmesh_gateway_requests_total", method="user.*", decision="allowed")
        == 1
    )
    for reason in ("no_credential", "method_denied"):
        assert moved(gw, gw_before, "phabmesh_gateway_refusals_total", reason=reason) == 1
    assert value(gw, "phabmesh_gateway_fail_closed") == 0.0
    # Watches: connected, and alive during the scenario (its leases and bindings were events).
    for samples, before, watched in (
        (
            op,
            op_before,
            {"leases", "bindings", "bots", "namespaces", "secrets", "pods", "webhooks"},
        ),
        (
            gw,
            gw_before,
            {"leases", "bindings", "bots", "namespaces", "secrets", "pods", "webhooks"},
        ),
    ):
        connected = series(samples, "phabmesh_watch_connected")
        assert {dict(key)["resource"] for key in connected} == watched
        assert set(connected.values()) == {1.0}
        for resource in ("leases", "bindings"):
            last = value(samples, "phabmesh_watch_last_resync_timestamp_seconds", resource=resource)
            assert last >= started
            assert last > value(
                before, "phabmesh_watch_last_resync_timestamp_seconds", resource=resource
            )
            assert last <= time.time()
    # Expiry and rotation times, as the Secrets say.
    tls = cluster.core.read_namespaced_secret("phabmesh-webhook-tls", SYSTEM)
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls.data["tls.crt"]))
    assert value(op, "phabmesh_webhook_certificate_expiry_timestamp_seconds") == (
        cert.not_valid_after_utc.timestamp()
    )
    keys = cluster.core.read_namespaced_secret("phabmesh-signing-keys", SYSTEM)
    ring = credentials.KeyRing.from_secret_data(keys.data)
    interval = operator.process.settings.key_rotation_interval  # type: ignore[attr-defined]
    due = ring.current.created_at + datetime.timedelta(seconds=interval)
    assert value(op, "phabmesh_signing_key_rotation_due_timestamp_seconds") == due.timestamp()

    # -- the binding is deleted: its lease is revoked, its series go ------------------------
    cluster.custom.delete_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, "runners"
    )
    wait_for(lambda: not active_leases(cluster, namespace), what="the lease's revocation")
    wait_for(
        lambda: not series(scrape(operator), "phabmesh_binding_ready", namespace=namespace),
        what="the binding's Ready series to go",
    )
    refused = gateway_call(gateway, "user.whoami", credential)
    assert refused["error_code"] == "ERR-INVALID-AUTH"
    op2, gw2 = scrape(operator), scrape(gateway)
    assert moved(op2, op, "phabmesh_leases_revoked_total", reason="BindingDeleted") >= 1
    assert not series(op2, "phabmesh_leases_active", namespace=namespace)
    assert moved(gw2, gw, "phabmesh_gateway_refusals_total", reason="BindingDeleted") == 1

    # -- a bot whose Secret is missing, then present, then deleted: one series at a time -----
    other = f"bot2-{namespace}"
    create_bot(cluster, other, f"{other}-token")
    wait_for(lambda: reason_of(cluster, other) == "SecretMissing", what="SecretMissing")
    wait_for(
        lambda: (
            series(scrape(operator), "phabmesh_bot_ready", bot=other)
            == {frozenset({("bot", other), ("reason", "SecretMissing")}): 0.0}
        ),
        what="the bot's SecretMissing series",
    )
    assert moved(scrape(operator), op2, "phabmesh_bot_checks_total", result="SecretMissing") >= 1
    conduit.add_user(other, bot=True)
    cluster.core.create_namespaced_secret(
        SYSTEM,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"{other}-token"),
            data={"token": base64.b64encode(conduit.add_token(other).encode()).decode()},
        ),
    )
    wait_for(lambda: reason_of(cluster, other) == "Verified", what="the bot to be Verified")
    wait_for(
        lambda: (
            series(scrape(operator), "phabmesh_bot_ready", bot=other)
            == {frozenset({("bot", other), ("reason", "Verified")}): 1.0}
        ),
        what="the bot's series to move to Verified",
    )
    for name in (other, bot):
        delete_bot(cluster, name)
    wait_for(
        lambda: (
            not (
                series(s := scrape(operator), "phabmesh_bot_ready", bot=other)
                or series(s, "phabmesh_bot_ready", bot=bot)
            )
        ),
        what="the deleted bots' series to go",
    )
