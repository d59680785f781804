"""The World keeps the newest state of a lease, whatever order its writes and events come in."""

from __future__ import annotations

import pytest

from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BotView, World


def _lease(version: str, phase: str) -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {
                "name": "pod-a.runners.12345678",
                "namespace": "build",
                "uid": "l1",
                "resourceVersion": version,
            },
            "spec": {"podUID": "p1", "podName": "pod-a", "binding": "runners", "bot": "ci-bot"},
            "status": {"phase": phase} if phase else {},
        }
    )


def test_a_late_create_event_does_not_undo_the_active_status_already_written() -> None:
    world = World()
    world.put_lease(_lease("12", "Active"))  # the writer's answer to its status write
    world.put_lease(_lease("11", ""))  # the create event, handled after it
    assert [lease.active for lease in world.leases_of_pod("p1")] == [True]
    world.put_lease(_lease("13", "Revoked"))
    world.put_lease(_lease("12", "Active"))  # the status event, handled after the revocation
    assert [lease.phase for lease in world.leases_of_pod("p1")] == ["Revoked"]


def test_versions_that_are_not_numbers_are_taken_as_they_come() -> None:
    world = World()
    world.put_lease(_lease("b", "Active"))
    world.put_lease(_lease("a", "Revoked"))
    assert [lease.phase for lease in world.leases_of_pod("p1")] == ["Revoked"]


def _incarnation(uid: str, version: str) -> LeaseView:
    lease = _lease(version, "Active")
    return LeaseView.from_body(
        {
            "metadata": {
                "name": lease.name,
                "namespace": lease.namespace,
                "uid": uid,
                "resourceVersion": version,
            },
            "spec": {"podUID": "p1", "podName": "pod-a", "binding": "runners", "bot": "ci-bot"},
            "status": {"phase": "Active"},
        }
    )


def test_the_deletion_of_an_earlier_lease_never_drops_its_successor() -> None:
    world = World()
    first = _incarnation("first-uid", "10")
    world.put_lease(first)
    world.drop_lease(first.key, "first-uid")
    second = _incarnation("second-uid", "20")
    world.put_lease(second)
    # The first lease's DELETED event arrives late: the lease now under the name stays.
    assert world.drop_lease(second.key, "first-uid") is None
    assert world.leases[second.key].uid == "second-uid"
    assert world.leases_of_pod("p1") == [second]
    assert world.drop_lease(second.key, "second-uid") == second
    assert second.key not in world.leases


def _bot_body(generation: int, *conditions: tuple[str, str, int]) -> dict[str, object]:
    return {
        "metadata": {"name": "b", "generation": generation},
        "spec": {"username": "b", "tokenSecretRef": {"name": "s"}},
        "status": {
            "conditions": [
                {"type": t, "status": s, "observedGeneration": g, "reason": "R", "message": ""}
                for t, s, g in conditions
            ]
        },
    }


@pytest.mark.parametrize(
    ("conditions", "usable"),
    [
        ((("Ready", "True", 3),), True),
        ((("Ready", "Unknown", 3), ("TokenVerified", "True", 3)), True),
        # Phabricator down and never verified, verified only for an older spec, or last told no.
        ((("Ready", "Unknown", 3),), False),
        ((("Ready", "Unknown", 3), ("TokenVerified", "True", 2)), False),
        ((("Ready", "Unknown", 3), ("TokenVerified", "False", 3)), False),
        ((("Ready", "False", 3), ("TokenVerified", "False", 3)), False),
    ],
)
def test_a_bot_is_usable_as_its_status_says_whatever_process_reads_it(
    conditions: tuple[tuple[str, str, int], ...], usable: bool
) -> None:
    assert BotView.from_body(_bot_body(3, *conditions)).ready is usable
