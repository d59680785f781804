"""A pod decoded through its shape reduces exactly as the whole body does.

Every reader of the pod watch (the controller's ``PodFacts``, the gateway's ``pod_life``, the
informer's key and resourceVersion) is compared on bodies as the API returns them, and on
arbitrary ones: a field a reader reads that the shape forgot fails here.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from phabmesh import identity
from phabmesh.kube import shapes
from phabmesh.kube.informer import object_key
from phabmesh.leases.podends import pod_life
from phabmesh.leases.view import LeaseView

NAMING = identity.Naming(control_plane_namespace="linkerd", trust_domain="cluster.local")
STAMP = "2026-01-01T00:00:00Z"


def _readings(pod: dict[str, Any]) -> tuple[object, ...]:
    meta = pod.get("metadata") or {}
    return (
        identity.PodFacts.from_pod(pod, NAMING),
        identity.PodFacts.from_pod(pod),
        pod_life(pod),
        object_key(pod),
        meta.get("resourceVersion"),
    )


def _via_list(pod: dict[str, Any]) -> dict[str, Any]:
    page = shapes.POD.page(
        json.dumps(
            {"kind": "PodList", "metadata": {"resourceVersion": "9"}, "items": [pod]}
        ).encode()
    )
    assert page["metadata"] == {"resourceVersion": "9"}
    (item,) = page["items"]
    return item  # type: ignore[no-any-return]


def _via_event(pod: dict[str, Any], kind: str = "MODIFIED") -> dict[str, Any]:
    event = shapes.POD.event(json.dumps({"type": kind, "object": pod}).encode())
    assert event["type"] == kind
    return event["object"]  # type: ignore[no-any-return]


def kubelet_pod(*, meshed: bool, phase: str = "Running", **meta: Any) -> dict[str, Any]:
    """A pod as the API server returns it once a kubelet runs it."""
    proxy = {
        "name": "linkerd-proxy",
        "image": "cr.l5d.io/linkerd/proxy:edge-25.1.1",
        "restartPolicy": "Always",
        "env": [
            {"name": "_l5d_ns", "value": "linkerd"},
            {"name": "_l5d_trustdomain", "value": "cluster.local"},
            {
                "name": "LINKERD2_PROXY_POD",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
        ],
        "ports": [{"containerPort": 4143, "name": "linkerd-proxy", "protocol": "TCP"}],
    }
    running = {"running": {"startedAt": STAMP}}
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-7d9c-abcde",
            "generateName": "web-7d9c-",
            "namespace": "shop",
            "uid": "0b1c7a3e-5c2b-4b7e-9a2d-1f0e6c9d8a7b",
            "resourceVersion": "123456",
            "creationTimestamp": STAMP,
            "labels": {"app": "web", "linkerd.io/control-plane-ns": "linkerd"}
            if meshed
            else {"app": "web"},
            "annotations": {"linkerd.io/proxy-version": "edge-25.1.1"} if meshed else {},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d9c",
                    "uid": "u",
                    "controller": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": STAMP,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}},
                }
            ],
            **meta,
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                }
            ],
            "initContainers": [proxy] if meshed else [],
            "containers": [{"name": "app", "image": "app", "env": [{"name": "A", "value": "1"}]}],
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "nodeName": "node-1",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
        },
        "status": {
            "phase": phase,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": STAMP,
                }
            ],
            "podIP": "10.0.0.7",
            "initContainerStatuses": [
                {"name": "linkerd-proxy", "ready": True, "restartCount": 0, "state": running}
            ]
            if meshed
            else [],
            "containerStatuses": [
                {"name": "app", "ready": True, "restartCount": 0, "state": running}
            ],
        },
    }


REAL = [
    kubelet_pod(meshed=True),
    kubelet_pod(meshed=False),
    kubelet_pod(meshed=True, phase="Pending"),
    kubelet_pod(meshed=True, deletionTimestamp=STAMP, deletionGracePeriodSeconds=30),
    kubelet_pod(meshed=True, phase="Succeeded"),
    {"metadata": {"name": "bare"}},
    {},
]


def test_every_reader_reads_the_same_from_a_pods_shape_as_from_its_whole_body() -> None:
    for pod in REAL:
        assert _readings(_via_list(pod)) == _readings(pod)
        assert _readings(_via_event(pod)) == _readings(pod)


def test_the_shape_drops_what_no_reader_reads() -> None:
    item = _via_list(kubelet_pod(meshed=True))
    assert "managedFields" not in item["metadata"]
    assert "volumes" not in item["spec"]
    assert "conditions" not in item["status"]
    assert item["spec"]["initContainers"][0]["env"][2] == {"name": "LINKERD2_PROXY_POD"}


def test_a_watch_error_keeps_its_status_whole_and_a_bookmark_its_version() -> None:
    status = {
        "kind": "Status",
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": "too old",
    }
    assert shapes.POD.event(json.dumps({"type": "ERROR", "object": status}).encode()) == {
        "type": "ERROR",
        "object": status,
    }
    bookmark = {
        "kind": "Pod",
        "metadata": {"resourceVersion": "77", "annotations": {"k8s.io/initial-events-end": "true"}},
    }
    assert _via_event(bookmark, "BOOKMARK")["metadata"]["resourceVersion"] == "77"


def test_a_body_that_does_not_fit_the_shape_is_decoded_whole() -> None:
    odd = {"metadata": {"name": "p", "labels": {"a": 1}}, "spec": {"nodeName": ["x"]}}
    assert _via_list(odd) == odd
    assert _via_event(odd) == odd


def test_a_continued_list_keeps_its_continue_token() -> None:
    body = {"metadata": {"resourceVersion": "", "continue": "abc"}, "items": []}
    page = shapes.POD.page(json.dumps(body).encode())
    assert page["metadata"]["continue"] == "abc"
    assert page["items"] == []


# Arbitrary bodies: any subset of what the readers look at, with arbitrary values and extras.
_text = st.text(max_size=12)
_names = st.sampled_from(["linkerd-proxy", "app", "linkerd-init", ""]) | _text
_env = st.fixed_dictionaries(
    {"name": st.sampled_from(["_l5d_ns", "_l5d_trustdomain", "OTHER"]) | _text},
    optional={
        "value": st.sampled_from(["linkerd", "cluster.local", "other", ""]) | _text,
        "valueFrom": st.just({"fieldRef": {"fieldPath": "x"}}),
    },
)
_container = st.fixed_dictionaries(
    {"name": _names},
    optional={
        "env": st.lists(_env, max_size=3),
        "image": _text,
        "restartPolicy": st.sampled_from(["Always", "Never"]),
    },
)
_labels = st.dictionaries(
    st.sampled_from(["app", "linkerd.io/control-plane-ns", "phab"]) | _text,
    st.sampled_from(["linkerd", "other", "yes"]) | _text,
    max_size=4,
)
_annotations = st.dictionaries(
    st.sampled_from(
        [
            "linkerd.io/proxy-version",
            "linkerd.io/inject",
            "kubectl.kubernetes.io/last-applied-configuration",
        ]
    )
    | _text,
    st.sampled_from(["enabled", "disabled", "ingress", "edge-25.1.1"]) | _text,
    max_size=3,
)


def _metadata(**more: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of an object's name, namespace, uid and version, and ``more``."""
    return st.fixed_dictionaries(
        {},
        optional={
            "name": _text,
            "namespace": _text,
            "uid": _text,
            "resourceVersion": st.integers(0, 10**9).map(str),
            **more,
        },
    )


_state = st.dictionaries(
    st.sampled_from(["running", "waiting", "terminated"]), st.just({"startedAt": STAMP}), max_size=2
)
_pod = st.fixed_dictionaries(
    {},
    optional={
        "metadata": _metadata(
            deletionTimestamp=st.just(STAMP) | st.none(),
            labels=_labels,
            annotations=_annotations,
            finalizers=st.lists(_text, max_size=2),
        ),
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "serviceAccountName": _text,
                "serviceAccount": _text,
                "nodeName": _text,
                "containers": st.lists(_container, max_size=3),
                "initContainers": st.lists(_container, max_size=3),
                "hostNetwork": st.booleans(),
            },
        ),
        "status": st.fixed_dictionaries(
            {},
            optional={
                "phase": st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"]),
                "initContainerStatuses": st.lists(
                    st.fixed_dictionaries({"name": _names}, optional={"state": _state}), max_size=2
                ),
                "podIP": _text,
            },
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(_pod)
def test_arbitrary_pods_read_the_same_through_their_shape(pod: dict[str, Any]) -> None:
    assert _readings(_via_list(pod)) == _readings(pod)
    assert _readings(_via_event(pod, "ADDED")) == _readings(pod)


def test_the_shapes_decoder_is_typed() -> None:
    # The shape is what makes the decoding cheap: a plain decoder would build every field.
    assert isinstance(shapes.POD._list, msgspec.json.Decoder)
    assert shapes.POD._list.type is not Any


# -- leases -----------------------------------------------------------------------------------


def _lease_readings(lease: dict[str, Any]) -> tuple[object, ...]:
    meta = lease.get("metadata") or {}
    return (LeaseView.from_body(lease), object_key(lease), meta.get("resourceVersion"))


def _lease_via_list(lease: dict[str, Any]) -> dict[str, Any]:
    page = shapes.LEASE.page(json.dumps({"metadata": {}, "items": [lease]}).encode())
    (item,) = page["items"]
    return item  # type: ignore[no-any-return]


def stored_lease(**status: Any) -> dict[str, Any]:
    """A lease as the API server returns it: the operator's fields, and what the server adds."""
    return {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorCredential",
        "metadata": {
            "name": "web-7d9c-abcde-runners",
            "namespace": "shop",
            "uid": "7c1d2e3f-0000-4000-8000-000000000001",
            "resourceVersion": "98765",
            "generation": 1,
            "creationTimestamp": STAMP,
            "labels": {"phabmesh.io/binding": "runners"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "u"}],
            "managedFields": [{"manager": "phabmesh", "operation": "Update", "time": STAMP}],
        },
        "spec": {
            "podUID": "0b1c7a3e-5c2b-4b7e-9a2d-1f0e6c9d8a7b",
            "podName": "web-7d9c-abcde",
            "binding": "runners",
            "bot": "ci-bot",
            "identity": "web.shop.serviceaccount.identity.linkerd.cluster.local",
        },
        "status": {
            "phase": "Active",
            "botPHID": "PHID-USER-abcdefghijklmnopqrst",
            "issuedAt": STAMP,
            "expiresAt": "2026-01-01T00:10:00Z",
            "renewedAt": STAMP,
            "conditions": [{"type": "Active", "status": "True"}],
            **status,
        },
    }


def test_a_lease_reads_the_same_through_its_shape() -> None:
    for lease in (
        stored_lease(),
        stored_lease(phase="Revoked", reason="PodTerminating"),
        {"metadata": {"name": "bare", "namespace": "x"}},
        {},
    ):
        assert _lease_readings(_lease_via_list(lease)) == _lease_readings(lease)
        event = shapes.LEASE.event(json.dumps({"type": "MODIFIED", "object": lease}).encode())
        assert _lease_readings(event["object"]) == _lease_readings(lease)
    assert "managedFields" not in _lease_via_list(stored_lease())["metadata"]


_time = st.sampled_from([STAMP, "2026-06-01T12:00:00Z", "2026-06-01T12:00:00.5Z"])
_lease = st.fixed_dictionaries(
    {},
    optional={
        "metadata": _metadata(finalizers=st.lists(_text, max_size=2)),
        "spec": st.fixed_dictionaries(
            {},
            optional={k: _text for k in ("podUID", "podName", "binding", "bot", "identity")},
        ),
        "status": st.fixed_dictionaries(
            {},
            optional={
                "phase": st.sampled_from(["Pending", "Active", "Revoked"]) | _text,
                "reason": _text,
                "botPHID": _text,
                "issuedAt": _time,
                "expiresAt": _time,
                "renewedAt": _time,
                "message": _text,
            },
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(_lease)
def test_arbitrary_leases_read_the_same_through_their_shape(lease: dict[str, Any]) -> None:
    assert _lease_readings(_lease_via_list(lease)) == _lease_readings(lease)
