"""The fake API server of the reconciler write tables answers as the API server does where the
controller's writes depend on it (tests/fakekube.py)."""

from __future__ import annotations

from typing import Any

import pytest

from phabmesh.kube import Conflict, KubeError, NotFound
from phabmesh.resources import bot_path, lease_path, resource_path
from tests.fakekube import FakeKube, merge

LEASE = lease_path("build", "l1")
BOT = bot_path("ci-bot")


def _cluster() -> FakeKube:
    return FakeKube(
        {
            LEASE: {
                "metadata": {"name": "l1", "namespace": "build", "uid": "u1"},
                "spec": {"podUID": "p1"},
                "status": {"phase": "Active", "conditions": [{"type": "A"}]},
            },
            BOT: {"metadata": {"name": "ci-bot", "uid": "b1"}, "spec": {"username": "ci-bot"}},
        }
    )


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386's own examples, in part
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_merge_patch_is_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    assert merge(target, patch) == result


async def test_every_write_bumps_the_resource_version_and_is_recorded() -> None:
    kube = _cluster()
    before = int(kube.objects[LEASE]["metadata"]["resourceVersion"])
    answer = await kube.merge_patch(LEASE, {"status": {"renewedAt": "t"}})
    assert int(answer["metadata"]["resourceVersion"]) > before
    assert answer["status"]["renewedAt"] == "t"
    await kube.get(LEASE)
    assert kube.calls == [
        ("merge_patch", LEASE, {"status": {"renewedAt": "t"}}),
        ("get", LEASE, None),
    ]
    assert kube.writes == kube.calls[:1]


async def test_a_stale_resource_version_in_a_merge_patch_conflicts() -> None:
    kube = _cluster()
    with pytest.raises(Conflict):
        await kube.merge_patch(LEASE, {"metadata": {"resourceVersion": "1"}, "spec": {"x": 1}})
    version = kube.objects[LEASE]["metadata"]["resourceVersion"]
    await kube.merge_patch(LEASE, {"metadata": {"resourceVersion": version}, "spec": {"x": 1}})
    assert kube.objects[LEASE]["spec"] == {"podUID": "p1", "x": 1}


async def test_json_patch_ops_and_a_failed_test_is_422_with_nothing_written() -> None:
    kube = _cluster()
    await kube.json_patch(
        LEASE,
        [
            {"op": "test", "path": "/metadata/uid", "value": "u1"},
            {"op": "add", "path": "/status/reason", "value": "PodDeleted"},
            {"op": "replace", "path": "/status/phase", "value": "Revoked"},
            {"op": "add", "path": "/status/conditions/0", "value": {"type": "Z"}},
            {"op": "remove", "path": "/status/conditions/1"},
            {"op": "add", "path": "/metadata/labels", "value": {"a/b": "c"}},
            {"op": "remove", "path": "/metadata/labels/a~1b"},
        ],
    )
    held = kube.objects[LEASE]
    assert held["status"] == {
        "phase": "Revoked",
        "reason": "PodDeleted",
        "conditions": [{"type": "Z"}],
    }
    assert held["metadata"]["labels"] == {}
    version = held["metadata"]["resourceVersion"]
    refused: list[list[dict[str, Any]]] = [
        [{"op": "test", "path": "/metadata/uid", "value": "another"}],
        [{"op": "test", "path": "/metadata/nothing", "value": "u1"}],
        [{"op": "add", "path": "/status/x", "value": 1}, {"op": "remove", "path": "/spec/none"}],
        [{"op": "replace", "path": "/status/conditions/5", "value": 1}],
        [{"op": "add", "path": "/none/x", "value": 1}],
        [{"op": "move", "from": "/spec", "path": "/x"}],
    ]
    for ops in refused:
        with pytest.raises(KubeError) as error:
            await kube.json_patch(LEASE, ops)
        assert error.value.status == 422
    assert kube.objects[LEASE]["metadata"]["resourceVersion"] == version
    assert "x" not in kube.objects[LEASE]["status"]


async def test_the_status_subresource_writes_only_the_status_and_the_object_never_does() -> None:
    kube = _cluster()
    await kube.merge_patch(BOT, {"spec": {"username": "other"}, "status": {"phid": "x"}})
    assert "status" not in kube.objects[BOT]
    assert kube.objects[BOT]["spec"] == {"username": "other"}
    await kube.merge_patch(
        BOT + "/status", {"spec": {"username": "again"}, "status": {"phid": "y"}}
    )
    assert kube.objects[BOT]["status"] == {"phid": "y"}
    assert kube.objects[BOT]["spec"] == {"username": "other"}
    with pytest.raises(NotFound):  # leases have no status subresource
        await kube.merge_patch(LEASE + "/status", {"status": {"phase": "Revoked"}})
    created = await kube.create(bot_path(), {"metadata": {"name": "b2"}, "status": {"phid": "z"}})
    assert "status" not in created
    lease = await kube.create(lease_path("build"), {"metadata": {"name": "l2"}, "status": {"p": 1}})
    assert lease["status"] == {"p": 1}
    assert lease["metadata"]["uid"] and lease["metadata"]["resourceVersion"]


async def test_not_found_and_conflicts_as_the_api_server_answers_them() -> None:
    kube = _cluster()
    with pytest.raises(Conflict):
        await kube.create(lease_path("build"), {"metadata": {"name": "l1"}})
    with pytest.raises(Conflict):  # a UID precondition that does not hold
        await kube.delete(LEASE, body={"preconditions": {"uid": "another"}})
    await kube.delete(LEASE, body={"preconditions": {"uid": "u1"}})
    for call in (
        kube.get(LEASE),
        kube.delete(LEASE),
        kube.merge_patch(LEASE, {"status": {}}),
        kube.json_patch(LEASE, []),
    ):
        with pytest.raises(NotFound):
            await call


async def test_an_injected_failure_or_answer_is_given_once_and_recorded() -> None:
    kube = _cluster()
    review = resource_path("authorization.k8s.io", "v1", "selfsubjectaccessreviews")
    kube.fail("delete", LEASE, KubeError(403, "Forbidden", "no"))
    kube.answer("create", review, {"status": {"allowed": True}})
    with pytest.raises(KubeError):
        await kube.delete(LEASE)
    assert LEASE in kube.objects
    assert await kube.create(review, {"spec": {}}) == {"status": {"allowed": True}}
    await kube.delete(LEASE)
    assert LEASE not in kube.objects
    assert [call[0] for call in kube.calls] == ["delete", "create", "delete"]


async def test_lists_hold_every_namespace_or_one() -> None:
    kube = _cluster()
    kube.put(lease_path("other", "l9"), {"metadata": {"name": "l9", "namespace": "other"}})
    everywhere, _ = await kube.list_all(lease_path(None))
    assert sorted(o["metadata"]["name"] for o in everywhere) == ["l1", "l9"]
    here, _ = await kube.list_all(lease_path("other"))
    assert [o["metadata"]["name"] for o in here] == ["l9"]
    bots, _ = await kube.list_all(bot_path())
    assert [o["metadata"]["name"] for o in bots] == ["ci-bot"]
