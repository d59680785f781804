import pytest
from hypothesis import given
from hypothesis import strategies as st

from phabmesh import identity

DNS = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)


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


@given(sa=DNS, ns=DNS)
def test_both_spellings_round_trip(sa: str, ns: str) -> None:
    dns = identity.linkerd_identity(sa, ns)
    assert identity.parse_identity(dns) == (sa, ns)
    assert identity.spiffe_to_dns(identity.spiffe_id(sa, ns)) == dns
    assert identity.parse_identity(identity.spiffe_id(sa, ns)) == (sa, ns)


@pytest.mark.parametrize(
    "name",
    [
        "ci.build.serviceaccount.identity.other.cluster.local",
        "a.b.c.serviceaccount.identity.linkerd.cluster.local",
        "spiffe://cluster.local/ns/build",
        "",
    ],
)
def test_foreign_names_are_not_parsed(name: str) -> None:
    assert identity.parse_identity(name) is None


def _pod(**kw: object) -> dict[str, object]:
    spec: dict[str, object] = {"containers": [{"name": "app"}]}
    spec.update(kw.pop("spec", {}))  # type: ignore[call-overload]
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1", **kw},
        "spec": spec,
        "status": {"phase": "Running"},
    }


@pytest.mark.parametrize(
    ("pod", "meshed"),
    [
        (
            _pod(spec={"initContainers": [{"name": "linkerd-proxy", "restartPolicy": "Always"}]}),
            True,
        ),
        (_pod(spec={"containers": [{"name": "app"}, {"name": "linkerd-proxy"}]}), True),
        (_pod(annotations={"linkerd.io/proxy-version": "edge-25.1.1"}), True),
        (_pod(labels={"linkerd.io/control-plane-ns": "linkerd"}), True),
        (_pod(annotations={"linkerd.io/inject": "enabled"}), False),
        (_pod(), False),
    ],
)
def test_meshed_detection(pod: dict[str, object], meshed: bool) -> None:
    facts = identity.PodFacts.from_pod(pod)
    assert facts.meshed is meshed
    assert facts.mesh_reason == (identity.MESHED if meshed else identity.NO_PROXY)


def test_pod_facts_are_small_and_complete() -> None:
    body = _pod(labels={"app": "x"}, deletionTimestamp="2026-01-01T00:00:00Z")
    facts = identity.PodFacts.from_pod(body)
    assert facts.service_account == "default"
    assert facts.terminating
    assert facts.labels == {"app": "x"}
    assert not hasattr(facts, "__dict__")  # slots: no per-instance dict
