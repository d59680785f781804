"""Linkerd identities of pods, both spellings, and meshed-pod detection."""

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phabmesh import identity

LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
SUBDOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(".".join)
NAMINGS = st.builds(identity.Naming, LABEL, st.lists(LABEL, min_size=1, max_size=3).map(".".join))


def test_linkerd_names() -> None:
    assert (
        identity.linkerd_identity("ci", "build")
        == "ci.build.serviceaccount.identity.linkerd.cluster.local"
    )
    naming = identity.Naming("l5d", "example.org")
    assert (
        identity.linkerd_identity("ci", "build", naming)
        == "ci.build.serviceaccount.identity.l5d.example.org"
    )
    assert identity.spiffe_id("ci", "build") == "spiffe://cluster.local/ns/build/sa/ci"
    assert identity.spiffe_id("ci", "build", naming) == "spiffe://example.org/ns/build/sa/ci"


@given(sa=SUBDOMAIN, ns=LABEL, naming=NAMINGS)
def test_both_spellings_round_trip(sa: str, ns: str, naming: identity.Naming) -> None:
    dns = identity.linkerd_identity(sa, ns, naming)
    assert identity.parse_identity(dns, naming) == (sa, ns)
    spiffe = identity.spiffe_id(sa, ns, naming)
    assert identity.spiffe_to_dns(spiffe, naming) == dns
    assert identity.parse_identity(spiffe, naming) == (sa, ns)
    assert identity.parse_spiffe(spiffe) == (naming.trust_domain, ns, sa)


def test_a_dotted_service_account_parses_unambiguously() -> None:
    # Namespaces cannot contain dots, ServiceAccount names can.
    name = "deploy.bot.build.serviceaccount.identity.linkerd.cluster.local"
    assert identity.parse_identity(name) == ("deploy.bot", "build")


@pytest.mark.parametrize(
    "name",
    [
        "ci.build.serviceaccount.identity.other.cluster.local",  # another control plane
        "ci.build.serviceaccount.identity.linkerd.example.org",  # another trust domain
        "build.serviceaccount.identity.linkerd.cluster.local",  # no service account
        ".build.serviceaccount.identity.linkerd.cluster.local",
        "CI.build.serviceaccount.identity.linkerd.cluster.local",  # not a Kubernetes name
        "ci.Build.serviceaccount.identity.linkerd.cluster.local",
        "*.build.serviceaccount.identity.linkerd.cluster.local",  # a pattern, not a name
        "spiffe://cluster.local/ns/build",
        "spiffe://cluster.local/ns/build/sa/",
        "spiffe://cluster.local/ns/build/sa/ci/extra",
        "spiffe://example.org/ns/build/sa/ci",  # another trust domain
        "spiffe://cluster.local/ns/b.uild/sa/ci",  # a namespace has no dots
        "",
    ],
)
def test_foreign_names_are_not_parsed(name: str) -> None:
    assert identity.parse_identity(name) is None


def test_spiffe_of_another_trust_domain_keeps_it() -> None:
    assert (
        identity.spiffe_to_dns("spiffe://example.org/ns/build/sa/ci")
        == "ci.build.serviceaccount.identity.linkerd.example.org"
    )
    assert identity.spiffe_to_dns("https://cluster.local/ns/build/sa/ci") is None


def _pod(
    *,
    containers: list[dict[str, object]] | None = None,
    init: list[dict[str, object]] | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **meta: object,
) -> dict[str, object]:
    spec: dict[str, object] = {"containers": containers or [{"name": "app"}]}
    if init is not None:
        spec["initContainers"] = init
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u1",
            "resourceVersion": "42",
            "annotations": annotations or {},
            "labels": labels or {},
            **meta,
        },
        "spec": spec,
        "status": {"phase": "Running"},
    }


INJECTED_MARKERS = {
    "annotations": {"linkerd.io/proxy-version": "edge-25.1.1", "linkerd.io/inject": "enabled"},
    "labels": {"linkerd.io/control-plane-ns": "linkerd", "linkerd.io/workload-ns": "ns"},
}


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        # Linkerd 2.20+: the proxy is a native sidecar (an init container that keeps running).
        (_pod(init=[{"name": "linkerd-init"}, {"name": "linkerd-proxy"}]), identity.MESHED),
        (_pod(containers=[{"name": "app"}, {"name": "linkerd-proxy"}]), identity.MESHED),
        (
            _pod(containers=[{"name": "app"}, {"name": "linkerd-proxy"}], **INJECTED_MARKERS),  # type: ignore[arg-type]
            identity.MESHED,
        ),
        # Linkerd's markers without its proxy: anyone who writes a pod writes its labels.
        (_pod(**INJECTED_MARKERS), identity.PROXY_MISSING),  # type: ignore[arg-type]
        (_pod(annotations={"linkerd.io/proxy-version": "stable-2.14.10"}), identity.PROXY_MISSING),
        (_pod(labels={"linkerd.io/control-plane-ns": "linkerd"}), identity.PROXY_MISSING),
        (
            _pod(
                labels={"linkerd.io/control-plane-ns": "linkerd"},
                annotations={"linkerd.io/inject": "disabled"},
            ),
            identity.PROXY_MISSING,
        ),
        # A container of another name is not the proxy, whatever its image.
        (
            _pod(containers=[{"name": "app"}, {"name": "proxy", "image": "cr.l5d.io/proxy"}]),
            identity.NO_PROXY,
        ),
        (_pod(annotations={"linkerd.io/inject": "enabled"}), identity.NOT_INJECTED),
        (_pod(annotations={"linkerd.io/inject": "ingress"}), identity.NOT_INJECTED),
        (_pod(annotations={"linkerd.io/inject": "disabled"}), identity.INJECTION_DISABLED),
        (_pod(annotations={"linkerd.io/proxy-version": ""}), identity.NO_PROXY),
        (_pod(init=[{"name": "linkerd-init"}]), identity.NO_PROXY),
        (_pod(), identity.NO_PROXY),
        ({}, identity.NO_PROXY),
    ],
)
def test_meshed_detection(pod: dict[str, object], reason: str) -> None:
    facts = identity.PodFacts.from_pod(pod)
    assert facts.mesh_reason == reason
    assert facts.meshed is (reason == identity.MESHED)


def test_a_proxy_wins_over_an_opt_out_annotation() -> None:
    pod = _pod(
        containers=[{"name": "app"}, {"name": "linkerd-proxy"}],
        annotations={"linkerd.io/inject": "disabled"},
    )
    assert identity.mesh_status(pod) == (True, identity.MESHED)


def test_another_control_plane_is_not_ours_when_naming_is_given() -> None:
    pod = _pod(
        containers=[{"name": "app"}, {"name": "linkerd-proxy"}],
        labels={"linkerd.io/control-plane-ns": "linkerd-other"},
    )
    assert identity.mesh_status(pod) == (True, identity.MESHED)
    assert identity.mesh_status(pod, identity.DEFAULT_NAMING) == (
        False,
        identity.OTHER_CONTROL_PLANE,
    )
    assert identity.mesh_status(pod, identity.Naming("linkerd-other")) == (True, identity.MESHED)


def test_pod_facts_are_small_and_complete() -> None:
    body = _pod(labels={"app": "x"}, deletionTimestamp="2026-01-01T00:00:00Z")
    body["spec"] = {"nodeName": "node-1", "containers": []}
    facts = identity.PodFacts.from_pod(body)
    assert facts.uid == "u1"
    assert facts.name == "p"
    assert facts.namespace == "ns"
    assert facts.service_account == "default"
    assert facts.phase == "Running"
    assert facts.terminating
    assert facts.labels == {"app": "x"}
    assert facts.node_name == "node-1"
    assert not hasattr(facts, "__dict__")  # slots: no per-instance dict
    assert not hasattr(facts, "resource_version")
    assert facts.identity() == "default.ns.serviceaccount.identity.linkerd.cluster.local"
    with pytest.raises(AttributeError):
        facts.phase = "Failed"  # type: ignore[misc]


def test_pod_facts_defaults_for_a_sparse_body() -> None:
    facts = identity.PodFacts.from_pod({"metadata": {"uid": "u"}, "spec": {}})
    assert (facts.phase, facts.service_account, facts.node_name) == ("Pending", "default", "")
    assert not facts.terminating
    assert len(facts.labels) == 0
    legacy = identity.PodFacts.from_pod({"spec": {"serviceAccount": "old"}})
    assert legacy.service_account == "old"


def test_pods_with_equal_labels_share_one_label_set() -> None:
    a = identity.PodFacts.from_pod(_pod(labels={"app": "runner", "pod-template-hash": "abc"}))
    b = identity.PodFacts.from_pod(_pod(labels={"pod-template-hash": "abc", "app": "runner"}))
    assert a.labels is b.labels
    assert a == b
    assert hash(a) == hash(b)  # frozen and hashable, labels included
    assert dict(a.labels) == {"app": "runner", "pod-template-hash": "abc"}
    assert a.labels != identity.labels_of({"app": "other"})
    key = next(iter(a.labels))
    assert key is sys.intern(key)


def test_labels_are_read_only() -> None:
    labels = identity.labels_of({"a": "1"})
    with pytest.raises(TypeError):
        labels["a"] = "2"  # type: ignore[index]
    assert labels.get("missing") is None
    assert "a" in labels
    assert repr(labels) == "Labels({'a': '1'})"


@given(st.dictionaries(LABEL, st.text(max_size=10), max_size=5))
def test_labels_equal_their_source(items: dict[str, str]) -> None:
    labels = identity.labels_of(items)
    assert labels == items
    assert identity.labels_of(dict(reversed(list(items.items())))) is labels


def _proxied(env: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "metadata": {"labels": labels or {}},
        "spec": {
            "initContainers": [
                {
                    "name": "linkerd-proxy",
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                }
            ]
        },
    }


def test_only_this_mesh_counts() -> None:
    here = identity.Naming("linkerd", "cluster.local")
    same = _proxied({"_l5d_ns": "linkerd", "_l5d_trustdomain": "cluster.local"})
    assert identity.mesh_status(same, here) == (True, identity.MESHED)
    assert identity.mesh_status(_proxied({}, {"linkerd.io/control-plane-ns": "other"}), here) == (
        False,
        identity.OTHER_CONTROL_PLANE,
    )
    assert identity.mesh_status(_proxied({"_l5d_ns": "other"}), here) == (
        False,
        identity.OTHER_CONTROL_PLANE,
    )
    other_domain = _proxied({"_l5d_ns": "linkerd", "_l5d_trustdomain": "example.org"})
    assert identity.mesh_status(other_domain, here) == (False, identity.OTHER_TRUST_DOMAIN)
    # Without the cluster's naming, any proxy counts (the injector's view).
    assert identity.mesh_status(other_domain) == (True, identity.MESHED)
    facts = identity.PodFacts.from_pod(other_domain, here)
    assert (facts.meshed, facts.mesh_reason) == (False, identity.OTHER_TRUST_DOMAIN)


def test_a_label_alone_never_counts_whatever_the_naming() -> None:
    """The label the churn oracle found enough for a lease, on a pod with no proxy."""
    label_only = _pod(labels={"linkerd.io/control-plane-ns": "linkerd"})
    for naming in (None, identity.DEFAULT_NAMING):
        assert identity.mesh_status(label_only, naming) == (False, identity.PROXY_MISSING)
    other = _pod(labels={"linkerd.io/control-plane-ns": "other"})
    assert identity.mesh_status(other, identity.DEFAULT_NAMING) == (False, identity.PROXY_MISSING)


@pytest.mark.parametrize(
    ("peer", "local", "local_proxy"),
    [
        ("127.0.0.1", "127.0.0.1", True),  # Linkerd before 2.11; the local control plane
        ("127.0.0.6", "10.1.2.3", True),  # any loopback address is inside the pod
        ("::1", "::1", True),
        ("10.1.2.3", "10.1.2.3", True),  # Linkerd 2.11+: the proxy connects to the pod's IP
        ("::ffff:10.1.2.3", "10.1.2.3", True),  # a dual-stack socket's spelling
        ("fd00::5", "fd00::5", True),
        ("10.1.2.4", "10.1.2.3", False),  # another pod: a port the proxy skips
        ("10.1.2.4", None, False),
        (None, "10.1.2.3", False),
        ("", "", False),
        ("not an address", "not an address", False),
        ("fe80::1%eth0", "fe80::2", False),
    ],
)
def test_only_the_pods_own_proxy_vouches_for_l5d_client_id(
    peer: str | None, local: str | None, local_proxy: bool
) -> None:
    name = "runner.ci.serviceaccount.identity.linkerd.cluster.local"
    assert identity.from_local_proxy(peer, local) is local_proxy
    assert identity.vouched_client_id(name, peer, local) == (name if local_proxy else None)
    assert identity.vouched_client_id(None, peer, local) is None
    assert identity.vouched_client_id("", peer, local) is None


def _status(phase: str, node: str, init_states: list[dict[str, object]]) -> dict[str, object]:
    return {
        "metadata": {"uid": "u", "name": "p", "namespace": "ns"},
        "spec": {"nodeName": node} if node else {},
        "status": {
            "phase": phase,
            "initContainerStatuses": [
                {"name": f"init-{i}", "state": state} for i, state in enumerate(init_states)
            ],
        },
    }


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
WAITING = {"waiting": {"reason": "PodInitializing"}}
DONE = {"terminated": {"exitCode": 0}}


@pytest.mark.parametrize(
    ("phase", "node", "init_states", "started"),
    [
        ("Running", "n", [], True),
        # A native sidecar (the agent) or an init container runs: the app containers wait for
        # it, so the pod stays Pending, and its credential is what they wait for.
        ("Pending", "n", [RUNNING], True),
        ("Pending", "n", [DONE, RUNNING], True),
        ("Pending", "n", [WAITING], False),
        ("Pending", "n", [DONE], False),
        ("Pending", "", [RUNNING], False),  # not on a node: nothing of it can run
        ("Pending", "n", [], False),
        ("Succeeded", "n", [RUNNING], False),
        ("Failed", "n", [RUNNING], False),
    ],
)
def test_a_pod_has_started_once_it_runs_or_one_of_its_init_containers_runs(
    phase: str, node: str, init_states: list[dict[str, object]], started: bool
) -> None:
    assert identity.PodFacts.from_pod(_status(phase, node, init_states)).started is started
