"""Each reconciler's exact writes, as table tests over a fake API server (tests/fakekube.py).

A row is the cluster before (objects by path), what happens (a piece of work, or a watch
event and the work it queues), and exactly what was written, in order: (verb, path, body)
of every lease and status write, and the Events, whole. The controller is the real one
(Memo, watches listing from the fake, the driver's work handler, the Writer); only the API
server, Phabricator and the clock are fakes. The start-up (first lists and the sweep) is part
of every row, so a row with no work shows what the start-up alone writes.

The work a row's handling queues for the other reconcilers is asserted too (``queued``): the
reconcilers ask each other's work through the queue, never by calling each other; a row
handles ``rounds`` rounds of queued work (one by default).

Two rows failed on the controller before their fixes:
``a-status-write-that-failed-is-written-at-the-next-periodic-pass`` (a bot's status write
the API server did not take was tried again only after the recheck interval) and
``start-up-deletes-an-orphan-left-revoked-without-revoking-it-again`` (the start-up sweep
revoked a Revoked lease again).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from phabmesh import conduit
from phabmesh.controller.driver import BotWork, Work
from phabmesh.controller.memo import Memo
from phabmesh.controller.writer import Writer
from phabmesh.kube import KubeError, Unavailable
from phabmesh.kube.client import JSON
from phabmesh.leases.watches import Watches
from phabmesh.resources import binding_path, bot_path, lease_path, resource_path, webhook_path
from phabmesh.settings import Settings
from tests.fakekube import Call, FakeKube

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
T = "2026-03-01T12:00:00Z"  # NOW, as written
EARLIER = "2026-03-01T11:00:00Z"  # an earlier pass's time
T5 = "2026-03-01T12:00:05Z"  # NOW and one periodic pass (controller.driver.TICK)
IN_4M = "2026-03-01T12:04:00Z"  # a lease due for renewal (a 15m TTL, less than a third left)
IN_5M = "2026-03-01T12:05:00Z"  # NOW + a TTL shortened to 5m
IN_10M = "2026-03-01T12:10:00Z"  # a lease not due yet
IN_15M = "2026-03-01T12:15:00Z"  # NOW + the binding's TTL

OWN = "phabmesh-system"
PHID = "PHID-USER-cibot"
BOT = bot_path("ci-bot")
BINDING = binding_path("build", "runners")
LEASES = lease_path("build")
POD_UID = "5b3f9c2e-1111-4222-8333-444455556666"
LEASE_NAME = "runner-1.runners.5b3f9c2e"
LEASE = lease_path("build", LEASE_NAME)
LEASE_UID = "lease-uid-1"
IDENTITY = "runner.build.serviceaccount.identity.linkerd.cluster.local"
HOOK = webhook_path("build", "hook")
SSAR = resource_path("authorization.k8s.io", "v1", "selfsubjectaccessreviews")


# -- the cluster before -------------------------------------------------------------------


def cond(type_: str, status: str, reason: str, message: str, at: str = T, gen: int = 1) -> JSON:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": at,
        "observedGeneration": gen,
    }


VERIFIED_MSG = 'the token belongs to bot "ci-bot"'
VERIFIED: JSON = {
    "phid": PHID,
    "observedGeneration": 1,
    "conditions": [
        cond("Ready", "True", "Verified", VERIFIED_MSG, EARLIER),
        cond("TokenVerified", "True", "Verified", VERIFIED_MSG, EARLIER),
    ],
    "lastCheckedAt": EARLIER,
}
INVALID_MSG = "Phabricator does not accept the token"
TOKEN_INVALID: JSON = {
    "phid": None,
    "observedGeneration": 1,
    "conditions": [
        cond("Ready", "False", "TokenInvalid", INVALID_MSG, EARLIER),
        cond("TokenVerified", "False", "TokenInvalid", INVALID_MSG, EARLIER),
    ],
    "lastCheckedAt": EARLIER,
}
ISSUED_MSG = "credentials are issued to matching pods"
BOT_READY_MSG = 'PhabricatorBot "ci-bot" is Ready'
NOT_READY_MSG = 'PhabricatorBot "ci-bot" is not Ready (TokenInvalid)'
NOT_ALLOWED_MSG = 'PhabricatorBot "ci-bot" does not exist or does not allow namespace "build"'


def binding_status(
    matched: int = 1, active: int = 0, at: str = EARLIER, gen: int = 1, **kw: Any
) -> JSON:
    """A binding's status as the operator writes it for a Ready verdict."""
    return {
        "observedGeneration": gen,
        "matchedPods": matched,
        "activeCredentials": active,
        "unmeshedPods": 0,
        "otherMeshPods": 0,
        "botPHID": PHID,
        "conditions": [
            cond("BotReady", "True", "Ready", BOT_READY_MSG, at, gen),
            cond("Ready", "True", "Ready", ISSUED_MSG, at, gen),
        ],
        **kw,
    }


NOT_READY_STATUS: JSON = {
    **binding_status(),
    "botPHID": None,
    "conditions": [
        cond("BotReady", "False", "TokenInvalid", NOT_READY_MSG, EARLIER),
        cond("Ready", "False", "BotNotReady", NOT_READY_MSG, EARLIER),
    ],
}
del NOT_READY_STATUS["botPHID"]
NOT_READY_AT_T: JSON = {
    **binding_status(),
    "botPHID": None,
    "conditions": [
        cond("BotReady", "False", "TokenInvalid", NOT_READY_MSG),
        cond("Ready", "False", "BotNotReady", NOT_READY_MSG),
    ],
}


def namespace(labels: dict[str, str] | None = None) -> dict[str, JSON]:
    return {
        resource_path("", "v1", "namespaces", None, "build"): {
            "metadata": {"name": "build", "labels": labels or {}}
        }
    }


def bot(status: JSON | None = None, selector: JSON | None = None) -> dict[str, JSON]:
    body: JSON = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorBot",
        "metadata": {"name": "ci-bot", "uid": "bot-uid", "generation": 1},
        "spec": {
            "username": "ci-bot",
            "tokenSecretRef": {"name": "ci-bot-token"},
            "namespaceSelector": selector or {},
        },
    }
    if status is not None:
        body["status"] = {k: v for k, v in status.items() if v is not None}
    return {BOT: body}


def token() -> dict[str, JSON]:
    data = {"token": base64.b64encode(b"api-cibottokencibottokencibot").decode()}
    path = resource_path("", "v1", "secrets", OWN, "ci-bot-token")
    return {path: {"metadata": {"name": "ci-bot-token", "namespace": OWN}, "data": data}}


def binding(status: JSON | None = None, generation: int = 1, **spec: Any) -> dict[str, JSON]:
    body: JSON = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorBinding",
        "metadata": {
            "name": "runners",
            "namespace": "build",
            "uid": "binding-uid",
            "generation": generation,
        },
        "spec": {
            "botRef": {"name": "ci-bot"},
            "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
            "allowedMethods": ["user.whoami"],
            **spec,
        },
    }
    if status is not None:
        body["status"] = status
    return {BINDING: body}


def pod(account: str = "runner", meshed: bool = True) -> dict[str, JSON]:
    containers = [{"name": "app"}] + ([{"name": "linkerd-proxy"}] if meshed else [])
    body: JSON = {
        "metadata": {"name": "runner-1", "namespace": "build", "uid": POD_UID},
        "spec": {"serviceAccountName": account, "nodeName": "node-a", "containers": containers},
        "status": {"phase": "Running"},
    }
    return {resource_path("", "v1", "pods", "build", "runner-1"): body}


def lease(expires: str = IN_10M, phase: str = "Active") -> dict[str, JSON]:
    body: JSON = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorCredential",
        "metadata": {"name": LEASE_NAME, "namespace": "build", "uid": LEASE_UID},
        "spec": {
            "podName": "runner-1",
            "podUID": POD_UID,
            "serviceAccount": "runner",
            "identity": IDENTITY,
            "binding": "runners",
            "bot": "ci-bot",
        },
        "status": {
            "phase": phase,
            "issuedAt": EARLIER,
            "renewedAt": EARLIER,
            "expiresAt": expires,
            "botPHID": PHID,
        },
    }
    if phase == "Pending":  # created without its status (an earlier version's two steps)
        del body["status"]
    if phase == "Revoked":  # revoked earlier, its delete not done
        reason = {"reason": "BotNotReady", "message": "bot not ready", "revokedAt": EARLIER}
        body["status"].update(reason)
    return {LEASE: body}


def webhook(status: JSON | None = None) -> dict[str, JSON]:
    body: JSON = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorWebhook",
        "metadata": {"name": "hook", "namespace": "build", "uid": "hook-uid", "generation": 1},
        "spec": {
            "herald": {"secretRef": {"name": "hook-key"}},
            "target": {"service": "listener", "port": 8080},
        },
        "status": status or {},
    }
    secret = {"metadata": {"name": "hook-key"}, "data": {"hmacKey": "c2VjcmV0"}}
    service = {"spec": {"selector": {"app": "listener"}, "ports": [{"port": 8080}]}}
    return {
        HOOK: body,
        resource_path("", "v1", "secrets", "build", "hook-key"): secret,
        resource_path("", "v1", "services", "build", "listener"): service,
    }


# -- what is written ----------------------------------------------------------------------


def bot_ref() -> JSON:
    return {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorBot",
        "name": "ci-bot",
        "uid": "bot-uid",
    }


def binding_ref() -> JSON:
    return {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorBinding",
        "namespace": "build",
        "name": "runners",
        "uid": "binding-uid",
    }


def pod_ref() -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "build",
        "name": "runner-1",
        "uid": POD_UID,
    }


def event(ref: JSON, reason: str, message: str, type_: str = "Normal", at: str = T) -> JSON:
    """An Event's body as the API server is sent it (its name's suffix is filled in by
    :func:`numbered`: the n-th Event of the test)."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": ref["name"], "namespace": ref.get("namespace", "default")},
        "involvedObject": ref,
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": "phabmesh"},
        "reportingComponent": "phabmesh.io/controller",
        "reportingInstance": "phabmesh",
        "firstTimestamp": at,
        "lastTimestamp": at,
        "count": 1,
    }


def numbered(events: list[JSON]) -> list[Call]:
    calls = []
    for n, expected in enumerate(events, start=1):
        body = {**expected, "metadata": {**expected["metadata"]}}
        body["metadata"]["name"] += f".{n:012x}"
        calls.append(("create", f"/api/v1/namespaces/{body['metadata']['namespace']}/events", body))
    return calls


def status_patch(path: str, status: JSON) -> Call:
    return ("merge_patch", path + "/status", {"status": status})


def revoked(reason: str, message: str) -> list[Call]:
    """A lease's revocation: Revoked (only that lease: its UID tested), then deleted (only
    that lease: a UID precondition)."""
    ops = [{"op": "test", "path": "/metadata/uid", "value": LEASE_UID}]
    ops += [
        {"op": "add", "path": f"/status/{k}", "value": v}
        for k, v in {
            "phase": "Revoked",
            "reason": reason,
            "revokedAt": T,
            "message": message,
        }.items()
    ]
    return [
        ("json_patch", LEASE, ops),
        ("delete", LEASE, {"propagationPolicy": "Background", "preconditions": {"uid": LEASE_UID}}),
    ]


DELETE_REVOKED: Call = (
    "delete",
    LEASE,
    {"propagationPolicy": "Background", "preconditions": {"uid": LEASE_UID}},
)


def revoked_event(reason: str) -> JSON:
    return event(
        pod_ref(),
        "CredentialRevoked",
        f"credential {LEASE_NAME} for PhabricatorBot ci-bot revoked: {reason}",
    )


ISSUED_LEASE: JSON = {
    "apiVersion": "phabmesh.io/v1alpha1",
    "kind": "PhabricatorCredential",
    "metadata": {
        "name": LEASE_NAME,
        "namespace": "build",
        "labels": {"phabmesh.io/binding": "runners", "phabmesh.io/bot": "ci-bot"},
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": "runner-1",
                "uid": POD_UID,
                "blockOwnerDeletion": False,
                "controller": False,
            }
        ],
    },
    "spec": {
        "podName": "runner-1",
        "podUID": POD_UID,
        "serviceAccount": "runner",
        "identity": IDENTITY,
        "binding": "runners",
        "bot": "ci-bot",
    },
    "status": {
        "phase": "Active",
        "issuedAt": T,
        "renewedAt": T,
        "expiresAt": IN_15M,
        "botPHID": PHID,
    },
}


# -- the fakes of Phabricator and the harness ---------------------------------------------


class FakeConduit:
    """Phabricator as a bot check asks it: whose token it is, and that account's roles."""

    def __init__(self, roles: tuple[str, ...] = ("bot",), error: Exception | None = None):
        self.roles = roles
        self.error = error

    def whoami(self, token: str) -> conduit.WhoAmI:
        if self.error is not None:
            raise self.error
        return conduit.WhoAmI(PHID, "ci-bot", "CI", ("agent",))

    def user_search(self, token: str, constraints: Any = None) -> list[conduit.User]:
        return [conduit.User(1, PHID, "ci-bot", "CI", self.roles)]


Act = Callable[[Memo], None]


def put(kind: str, key: Any, data: object = None) -> Act:
    """Queue a piece of work, as a watch event or the periodic pass would."""
    return lambda memo: memo.controller.queue.put(Work(kind, key), data)


def nothing(_memo: Memo) -> None:
    """No work: the start-up alone."""


@dataclasses.dataclass
class Run:
    memo: Memo
    kube: FakeKube
    events: FakeKube
    failures: list[tuple[Work, Exception]] = dataclasses.field(default_factory=list)
    retries: int = 0  # lease writes scheduled to be tried again


@pytest.fixture(autouse=True)
def _event_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Event's name suffix is its number in the test (see :func:`numbered`)."""
    count = iter(range(1, 1000))
    fake = types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=next(count) << 80))
    monkeypatch.setattr("phabmesh.kube.events.uuid", fake)


class Clock:
    """The controller's clock: NOW until a row moves it on (:func:`later`)."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime.datetime:
        return self.now


def later(seconds: float) -> Act:
    """Time goes on (the step queues nothing)."""

    def act(memo: Memo) -> None:
        clock = memo.clock
        assert isinstance(clock, Clock)
        clock.now += datetime.timedelta(seconds=seconds)

    return act


async def run(
    objects: dict[str, JSON],
    act: Act | tuple[Act, ...],
    *,
    rounds: int = 1,
    phabricator: FakeConduit | None = None,
    prepare: Callable[[FakeKube], None] = lambda _kube: None,
) -> tuple[Run, list[Work]]:
    """Start a controller over ``objects`` (first lists, the sweep), then each step of
    ``act``, each followed by ``rounds`` rounds of the work queued; the work left queued is
    returned. ``prepare`` readies the fake API server (a failure to inject) once the first
    lists are in."""
    kube, events, clock = FakeKube(objects), FakeKube(), Clock()
    memo = Memo(
        Settings.local("http://127.0.0.1:9"),
        conduit_client=phabricator or FakeConduit(),  # type: ignore[arg-type]
        clock=clock,
    )
    memo.use_client(kube)  # type: ignore[arg-type]
    memo.use_watches(Watches(kube, memo.naming, namespace=OWN))  # type: ignore[arg-type]
    memo.writer = Writer(kube, memo.world, clock, events_client=events)  # type: ignore[arg-type]
    loops: list[asyncio.Task[None]] = [
        asyncio.ensure_future(loop()) for loop in memo.watches.tasks().values()
    ]
    try:
        await asyncio.wait_for(memo.controller.start(), timeout=5)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    prepare(kube)
    queue = memo.controller.queue
    queue.order.clear()  # what the first lists queued: the cluster before is as it is
    queue.waiting.clear()
    done = Run(memo, kube, events)
    for step in act if isinstance(act, tuple) else (act,):
        step(memo)
        for _ in range(rounds):
            taken = [(work, queue.waiting.pop(work)) for work in queue.order]
            queue.order.clear()
            for work, data in taken:
                try:
                    await memo.controller.handle(work, data)
                except Exception as exc:  # as a worker does: logged, the next work goes on
                    done.failures.append((work, exc))
    await asyncio.gather(*memo.leases._pending_events)
    await asyncio.gather(*memo.writer._pending)
    done.retries = memo.leases.retries.pending
    await memo.leases.close()  # a retry scheduled is counted, not run
    return done, list(queue.order)


@dataclasses.dataclass(frozen=True)
class Row:
    objects: dict[str, JSON]
    act: Act | tuple[Act, ...]  # one step, or steps
    writes: list[Call]
    events: list[JSON] = dataclasses.field(default_factory=list)
    queued: list[Work] = dataclasses.field(default_factory=list)
    rounds: int = 1
    phabricator: FakeConduit | None = None
    prepare: Callable[[FakeKube], None] = lambda _kube: None
    failed: int = 0  # how many pieces of work failed (a worker logs them)
    retries: int = 0  # pods whose lease writes are to be tried again


def rows(table: dict[str, Row]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("row", list(table.values()), ids=list(table))


async def check(row: Row) -> Run:
    done, queued = await run(
        row.objects, row.act, rounds=row.rounds, phabricator=row.phabricator, prepare=row.prepare
    )
    assert len(done.failures) == row.failed, done.failures
    assert done.retries == row.retries
    assert done.kube.writes == row.writes
    assert done.events.calls == numbered(row.events)
    assert queued == row.queued
    return done


# -- Bots ---------------------------------------------------------------------------------

CHECK = put("bot", "ci-bot", BotWork(check=True))
FIRST_CHECK: JSON = {
    "phid": PHID,
    "observedGeneration": 1,
    "conditions": [
        cond("Ready", "True", "Verified", VERIFIED_MSG),
        cond("TokenVerified", "True", "Verified", VERIFIED_MSG),
    ],
}
UNAVAILABLE_MSG = "Phabricator is unavailable: ERR-UNAVAILABLE: connection refused"
MISSING_MSG = 'Secret "ci-bot-token" not found in namespace "phabmesh-system"'

BOTS = {
    "first-check-verifies": Row(
        {**namespace(), **bot(), **token(), **binding()},
        CHECK,
        [
            status_patch(
                BOT,
                {
                    "phid": PHID,
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Ready", "True", "Verified", VERIFIED_MSG),
                        cond("TokenVerified", "True", "Verified", VERIFIED_MSG),
                    ],
                    "lastCheckedAt": T,
                },
            )
        ],
        [event(bot_ref(), "Verified", VERIFIED_MSG)],
        # Its readiness changed: its namespaces' bindings are judged again, as their work.
        queued=[Work("namespace", "build")],
    ),
    "unchanged-outcome-writes-nothing": Row({**namespace(), **bot(VERIFIED), **token()}, CHECK, []),
    # A check whose outcome is the same (as at every start-up): its bindings are judged
    # again, and their pods, each planned from its own event, are not planned twice.
    "unchanged-outcome-judges-its-bindings-and-plans-no-pod-again": Row(
        {**namespace(), **bot(VERIFIED), **token(), **binding()},
        CHECK,
        [],
        queued=[Work("judge", "build")],
    ),
    "phabricator-unreachable-is-unknown-and-keeps-token-verified": Row(
        {**namespace(), **bot(VERIFIED), **token()},
        CHECK,
        [
            status_patch(
                BOT,
                {
                    "phid": PHID,
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Ready", "Unknown", "PhabricatorUnavailable", UNAVAILABLE_MSG),
                        cond("TokenVerified", "True", "Verified", VERIFIED_MSG, EARLIER),
                    ],
                    "lastCheckedAt": T,
                },
            )
        ],
        [event(bot_ref(), "PhabricatorUnavailable", UNAVAILABLE_MSG, "Warning")],
        phabricator=FakeConduit(
            error=conduit.PhabricatorUnavailable("ERR-UNAVAILABLE", "connection refused")
        ),
    ),
    "missing-secret": Row(
        {**namespace(), **bot(VERIFIED)},
        CHECK,
        [
            status_patch(
                BOT,
                {
                    "phid": None,
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Ready", "False", "SecretMissing", MISSING_MSG),
                        cond("TokenVerified", "False", "SecretMissing", MISSING_MSG),
                    ],
                    "lastCheckedAt": T,
                },
            )
        ],
        [event(bot_ref(), "SecretMissing", MISSING_MSG, "Warning")],
    ),
    "a-human-account-is-not-a-bot": Row(
        {**namespace(), **bot(), **token()},
        CHECK,
        [
            status_patch(
                BOT,
                {
                    "phid": PHID,
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Ready", "False", "NotABot", '"ci-bot" is a human account, not a bot'),
                        cond(
                            "TokenVerified",
                            "False",
                            "NotABot",
                            '"ci-bot" is a human account, not a bot',
                        ),
                    ],
                    "lastCheckedAt": T,
                },
            )
        ],
        [event(bot_ref(), "NotABot", '"ci-bot" is a human account, not a bot', "Warning")],
        phabricator=FakeConduit(roles=()),
    ),
    "a-token-phabricator-refuses-now": Row(
        {**namespace(), **bot(VERIFIED), **token(), **binding()},
        CHECK,
        [
            status_patch(
                BOT,
                {
                    "phid": None,
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Ready", "False", "TokenInvalid", INVALID_MSG),
                        cond("TokenVerified", "False", "TokenInvalid", INVALID_MSG),
                    ],
                    "lastCheckedAt": T,
                },
            )
        ],
        [event(bot_ref(), "TokenInvalid", INVALID_MSG, "Warning")],
        queued=[Work("namespace", "build")],
        phabricator=FakeConduit(error=conduit.InvalidAuth("ERR-INVALID-AUTH", "unknown token")),
    ),
    # A status write the API server did not take (unavailable past the client's retries) is
    # not the bot's status: the next periodic pass, seconds later, checks and writes it,
    # not the next recheck interval (5 minutes), meanwhile the bot's bindings stay
    # BotNotReady (a new bot) or its leases live on (a token Phabricator refuses now).
    "a-status-write-that-failed-is-written-at-the-next-periodic-pass": Row(
        {**namespace(), **bot(), **token()},
        (CHECK, later(5), put("bot", "ci-bot", BotWork(tick=True))),
        [
            status_patch(BOT, {**FIRST_CHECK, "lastCheckedAt": T}),
            status_patch(
                BOT,
                {
                    **FIRST_CHECK,
                    "conditions": [
                        cond("Ready", "True", "Verified", VERIFIED_MSG, T5),
                        cond("TokenVerified", "True", "Verified", VERIFIED_MSG, T5),
                    ],
                    "lastCheckedAt": T5,
                },
            ),
        ],
        [event(bot_ref(), "Verified", VERIFIED_MSG, at=T5)],
        prepare=lambda kube: kube.fail(
            "merge_patch", BOT + "/status", Unavailable(503, "ServiceUnavailable", "try again")
        ),
        failed=1,  # the first check's work (a worker logs it)
    ),
}


@rows(BOTS)
async def test_bots(row: Row) -> None:
    await check(row)


# -- Bindings -----------------------------------------------------------------------------

JUDGE = put("namespace", "build")
PLAN = [Work("pod", POD_UID)]  # the namespace's pods planned again, each as its own work
UNCHECKED_MSG = 'PhabricatorBot "ci-bot" is not checked yet'
SUBJECTS_MSG = (
    "spec.identityRefs[0].namespace: 'other' is another namespace; a binding only matches "
    "pods in its own ('build')"
)

WAITING: JSON = {
    **binding_status(matched=0),
    "conditions": [
        cond("BotReady", "False", "NotChecked", UNCHECKED_MSG, EARLIER),
        cond("Ready", "False", "BotNotReady", UNCHECKED_MSG, EARLIER),
    ],
}
del WAITING["botPHID"]

RESPECCED = bot(VERIFIED)
RESPECCED[BOT]["metadata"]["generation"] = 2
RESPECCED[BOT]["spec"]["username"] = "another-account"

BINDINGS = {
    "ready": Row(
        {**namespace(), **bot(VERIFIED), **binding(), **pod()},
        JUDGE,
        [status_patch(BINDING, binding_status(matched=1, at=T))],
        [event(binding_ref(), "Ready", ISSUED_MSG)],
        queued=PLAN,
    ),
    # Judged after a bot check whose outcome did not change (every start-up): its verdict
    # stands, nothing is written and no pod is planned again (each was, from its own event).
    "judged-after-a-check-the-same-verdict-plans-no-pod": Row(
        {**namespace(), **bot(VERIFIED), **binding(binding_status()), **pod()},
        put("judge", "build"),
        [],
    ),
    # The same with a verdict that changes: its pods are planned, from its status's answer.
    "judged-after-a-check-a-new-verdict-plans-its-pods": Row(
        {**namespace(), **bot(VERIFIED), **binding(), **pod()},
        put("judge", "build"),
        [status_patch(BINDING, binding_status(matched=1, at=T))],
        [event(binding_ref(), "Ready", ISSUED_MSG)],
        queued=PLAN,
    ),
    "bot-not-ready": Row(
        {**namespace(), **bot(TOKEN_INVALID), **binding(), **pod()},
        JUDGE,
        [
            status_patch(
                BINDING,
                {
                    **binding_status(matched=1),
                    "botPHID": None,
                    "conditions": [
                        cond("BotReady", "False", "TokenInvalid", NOT_READY_MSG),
                        cond("Ready", "False", "BotNotReady", NOT_READY_MSG),
                    ],
                },
            )
        ],
        [event(binding_ref(), "BotNotReady", NOT_READY_MSG, "Warning")],
        queued=PLAN,
    ),
    "bot-not-allowed-removes-bot-ready-and-bot-phid": Row(
        {
            **namespace(),
            **bot(VERIFIED, selector={"matchLabels": {"team": "ci"}}),
            **binding(binding_status(matched=0)),
        },
        JUDGE,
        [
            status_patch(
                BINDING,
                {
                    **binding_status(matched=0),
                    "botPHID": None,
                    "conditions": [cond("Ready", "False", "BotNotAllowed", NOT_ALLOWED_MSG)],
                },
            )
        ],
        [event(binding_ref(), "BotNotAllowed", NOT_ALLOWED_MSG, "Warning")],
        queued=[],  # no pod there
    ),
    "invalid-subjects": Row(
        {
            **namespace(),
            **bot(VERIFIED),
            **binding(
                identityRefs=[{"kind": "ServiceAccount", "name": "runner", "namespace": "other"}]
            ),
        },
        JUDGE,
        [
            status_patch(
                BINDING,
                {
                    **binding_status(matched=0),
                    "conditions": [
                        cond("BotReady", "True", "Ready", BOT_READY_MSG),
                        cond("Ready", "False", "InvalidSubjects", SUBJECTS_MSG),
                    ],
                },
            )
        ],
        [event(binding_ref(), "InvalidSubjects", SUBJECTS_MSG, "Warning")],
    ),
    "bot-not-checked-yet-is-written-without-an-event": Row(
        {**namespace(), **bot(), **binding()},
        JUDGE,
        [
            status_patch(
                BINDING,
                {
                    **binding_status(matched=0),
                    "botPHID": None,
                    "conditions": [
                        cond("BotReady", "False", "NotChecked", UNCHECKED_MSG),
                        cond("Ready", "False", "BotNotReady", UNCHECKED_MSG),
                    ],
                },
            )
        ],
    ),
    # Its bot's first answer after the binding waited for it is said, even when the reason
    # stays BotNotReady.
    "the-first-answer-after-waiting-is-said": Row(
        {**namespace(), **bot(TOKEN_INVALID), **binding(WAITING)},
        JUDGE,
        [
            status_patch(
                BINDING,
                {
                    **WAITING,
                    "botPHID": None,
                    "conditions": [
                        cond("BotReady", "False", "TokenInvalid", NOT_READY_MSG, EARLIER),
                        cond("Ready", "False", "BotNotReady", NOT_READY_MSG, EARLIER),
                    ],
                },
            )
        ],
        [event(binding_ref(), "BotNotReady", NOT_READY_MSG, "Warning")],
    ),
    # The bot's spec changed (another username, generation 2) and its check has not answered
    # yet (it is queued at once): the Ready of its earlier generation keeps it usable until
    # the check answers (resources.bot_usable). Any spec change bumps the generation, a
    # namespaceSelector edit too: taking the bot as unchecked would revoke every live lease
    # of it meanwhile, and for good while Phabricator is down; a definite "no" revokes.
    "a-bot-whose-spec-changed-stays-usable-until-its-check-answers": Row(
        {**namespace(), **RESPECCED, **binding()},
        JUDGE,
        [status_patch(BINDING, binding_status(matched=0, at=T))],
        [event(binding_ref(), "Ready", ISSUED_MSG)],
    ),
    "unchanged-verdict-writes-nothing": Row(
        {**namespace(), **bot(VERIFIED), **binding(binding_status(matched=1)), **pod()},
        JUDGE,
        [],
        queued=PLAN,
    ),
    "counts-only-change-is-written-without-an-event": Row(
        {**namespace(), **bot(VERIFIED), **binding(binding_status(matched=0)), **pod()},
        JUDGE,
        [status_patch(BINDING, binding_status(matched=1))],
        queued=PLAN,
    ),
}


@rows(BINDINGS)
async def test_bindings(row: Row) -> None:
    await check(row)


# -- Leases -------------------------------------------------------------------------------

POD = resource_path("", "v1", "pods", "build", "runner-1")
READY = {**namespace(), **bot(VERIFIED), **token(), **binding(binding_status(matched=1))}
HOLDING = {**READY, **binding(binding_status(matched=1, active=1)), **pod(), **lease()}
ISSUED_MSG_POD = (
    f"credential {LEASE_NAME} issued for PhabricatorBot ci-bot via binding runners, "
    f"expires {IN_15M}"
)


OPS_PHID = "PHID-USER-opsbot"
OPS_BOT = {
    bot_path("ops-bot"): {
        **bot(VERIFIED)[BOT],
        "metadata": {"name": "ops-bot", "uid": "ops-bot-uid", "generation": 1},
        "spec": {"username": "ops-bot", "tokenSecretRef": {"name": "ops"}, "namespaceSelector": {}},
        "status": {**VERIFIED, "phid": OPS_PHID},
    }
}
OPS_READY = [
    cond("BotReady", "True", "Ready", 'PhabricatorBot "ops-bot" is Ready', EARLIER, 2),
    cond("Ready", "True", "Ready", ISSUED_MSG, EARLIER, 2),
]
SWAPPED_LEASE: JSON = {
    **ISSUED_LEASE,
    "metadata": {
        **ISSUED_LEASE["metadata"],
        "labels": {"phabmesh.io/binding": "runners", "phabmesh.io/bot": "ops-bot"},
    },
    "spec": {**ISSUED_LEASE["spec"], "bot": "ops-bot"},
    "status": {**ISSUED_LEASE["status"], "botPHID": OPS_PHID},
}


def pod_deleted(memo: Memo) -> None:
    memo.client.objects.pop(POD)  # type: ignore[attr-defined]
    memo.watches.pods._drop("build/runner-1")


def terminating_pod() -> dict[str, JSON]:
    body = pod()[POD]
    body["metadata"]["deletionTimestamp"] = EARLIER
    return {POD: body}


def pod_terminating(memo: Memo) -> None:
    body = memo.client.objects[POD]  # type: ignore[attr-defined]
    body["metadata"]["deletionTimestamp"] = T
    memo.watches.pods._put("MODIFIED", "build/runner-1", body)


def bot_refused(memo: Memo) -> None:
    """Another replica's check wrote that Phabricator refuses the bot's token."""
    body = bot(TOKEN_INVALID)[BOT]
    memo.client.objects[BOT] = body  # type: ignore[attr-defined]
    memo.watches.bots._put("MODIFIED", "ci-bot", body)


def bot_deleted(memo: Memo) -> None:
    memo.client.objects.pop(BOT)  # type: ignore[attr-defined]
    memo.watches.bots._drop("ci-bot")


def binding_deleted(memo: Memo) -> None:
    memo.client.objects.pop(BINDING)  # type: ignore[attr-defined]
    memo.watches.bindings._drop("build/runners")


LEASES_TABLE = {
    "issue-for-a-matched-running-meshed-pod": Row(
        {**READY, **pod()},
        put("pod", POD_UID),
        [("create", LEASES, ISSUED_LEASE)],
        [event(pod_ref(), "CredentialIssued", ISSUED_MSG_POD)],
    ),
    "nothing-for-an-unmeshed-pod": Row({**READY, **pod(meshed=False)}, put("pod", POD_UID), []),
    "nothing-for-an-unmatched-pod": Row({**READY, **pod(account="other")}, put("pod", POD_UID), []),
    "revoke-on-pod-deletion": Row(
        HOLDING,
        pod_deleted,
        revoked("PodDeleted", "pod deleted"),
        [revoked_event("PodDeleted")],
    ),
    "revoke-when-the-pod-terminates": Row(
        HOLDING,
        pod_terminating,
        revoked("PodTerminating", "pod terminating"),
        [revoked_event("PodTerminating")],
    ),
    "revoke-on-binding-deletion": Row(
        HOLDING,
        binding_deleted,
        revoked("BindingDeleted", "binding deleted"),
        [revoked_event("BindingDeleted")],
        rounds=2,  # the namespace's work, then its pods'
    ),
    # Another replica's status write says the bot is not Ready: its bindings are judged
    # again (their status written), then their pods planned (the lease revoked).
    "revoke-when-the-bots-status-turns-not-ready": Row(
        HOLDING,
        bot_refused,
        [
            status_patch(BINDING, {**NOT_READY_AT_T, "activeCredentials": 1}),
            *revoked("BotNotReady", "bot not ready"),
        ],
        [
            event(binding_ref(), "BotNotReady", NOT_READY_MSG, "Warning"),
            revoked_event("BotNotReady"),
        ],
        rounds=2,
    ),
    "revoke-on-bot-deletion": Row(
        HOLDING,
        bot_deleted,
        [
            status_patch(
                BINDING,
                {
                    **binding_status(active=1),
                    "botPHID": None,
                    "conditions": [cond("Ready", "False", "BotNotAllowed", NOT_ALLOWED_MSG)],
                },
            ),
            *revoked("BotNotAllowed", "bot not allowed in this namespace"),
        ],
        [
            event(binding_ref(), "BotNotAllowed", NOT_ALLOWED_MSG, "Warning"),
            revoked_event("BotNotAllowed"),
        ],
        rounds=2,
    ),
    "revoke-when-the-bot-is-not-ready": Row(
        {**HOLDING, **binding(NOT_READY_STATUS)},
        put("pod", POD_UID),
        revoked("BotNotReady", "bot not ready"),
        [revoked_event("BotNotReady")],
    ),
    "a-shorter-ttl-shortens-live-leases-at-once": Row(
        {**HOLDING, **binding(binding_status(active=1), generation=2, credentialTTL="5m")},
        put("binding", ("build", "runners")),
        [
            status_patch(BINDING, binding_status(active=1, gen=2)),
            ("merge_patch", LEASE, {"status": {"renewedAt": T, "expiresAt": IN_5M}}),
        ],
        queued=PLAN,
    ),
    "renewal-when-due-on-the-periodic-pass": Row(
        {**HOLDING, **lease(expires=IN_4M)},
        put("bot", "ci-bot", BotWork(tick=True)),
        [("merge_patch", LEASE, {"status": {"renewedAt": T, "expiresAt": IN_15M}})],
    ),
    "no-renewal-before-due": Row(HOLDING, put("bot", "ci-bot", BotWork(tick=True)), []),
    "start-up-sweeps-an-orphan": Row(
        {k: v for k, v in HOLDING.items() if k != POD},
        nothing,
        revoked("PodGone", "pod gone"),
        [revoked_event("PodGone")],
        rounds=0,
    ),
    # An orphan the start-up finds Revoked already (its delete failed before a restart) is
    # deleted, as a pod's plan deletes one: not revoked again, which would overwrite its
    # reason and revokedAt (the record of when access ended, and why) and say a second
    # CredentialRevoked, "PodGone", on the pod.
    "start-up-deletes-an-orphan-left-revoked-without-revoking-it-again": Row(
        {k: v for k, v in {**HOLDING, **lease(phase="Revoked")}.items() if k != POD},
        nothing,
        [DELETE_REVOKED],
        rounds=0,
    ),
    "a-due-lease-of-a-terminating-pod-is-revoked-not-renewed": Row(
        {**HOLDING, **lease(expires=IN_4M), **terminating_pod()},
        put("bot", "ci-bot", BotWork(tick=True)),
        [
            *revoked("PodTerminating", "pod terminating"),
            # The pass then writes the binding's counts: the pod and its lease gone from them.
            status_patch(BINDING, binding_status(matched=0, active=0)),
        ],
        [revoked_event("PodTerminating")],
    ),
    "a-refused-delete-leaves-it-revoked-and-the-retry-deletes-it": Row(
        HOLDING,
        (pod_deleted, put("pod", POD_UID)),  # the event; the retry the refusal scheduled
        [*revoked("PodDeleted", "pod deleted"), DELETE_REVOKED],
        [revoked_event("PodDeleted")],
        prepare=lambda kube: kube.fail("delete", LEASE, KubeError(403, "Forbidden", "denied")),
        retries=1,  # the retry's timer, which the second step stands for
    ),
    "a-revoked-lease-left-behind-is-deleted-before-the-new-one-is-created": Row(
        {**READY, **pod(), **lease(phase="Revoked")},
        put("pod", POD_UID),
        [DELETE_REVOKED, ("create", LEASES, ISSUED_LEASE)],
        [event(pod_ref(), "CredentialIssued", ISSUED_MSG_POD)],
    ),
    # The binding names another bot now: the old bot's lease goes first, then the new bot's
    # lease is created under the same name (the pod's and the binding's).
    "a-bot-swap-revokes-then-issues-under-the-same-name": Row(
        {
            **HOLDING,
            **OPS_BOT,
            **binding(
                {**binding_status(active=1, gen=2, botPHID=OPS_PHID), "conditions": OPS_READY},
                generation=2,
                botRef={"name": "ops-bot"},
            ),
        },
        put("pod", POD_UID),
        [
            *revoked("BotChanged", "the binding names another bot now"),
            ("create", LEASES, SWAPPED_LEASE),
        ],
        [
            revoked_event("BotChanged"),
            event(pod_ref(), "CredentialIssued", ISSUED_MSG_POD.replace("ci-bot", "ops-bot")),
        ],
    ),
    # A lease created by an earlier version in two steps (no status yet): this pod's, so its
    # status is added (only to that lease: its UID tested), not a second one created.
    "a-pending-lease-of-this-pod-is-finished": Row(
        {**READY, **pod(), **lease(phase="Pending")},
        put("pod", POD_UID),
        [
            ("create", LEASES, ISSUED_LEASE),
            (
                "json_patch",
                LEASE,
                [
                    {"op": "test", "path": "/metadata/uid", "value": LEASE_UID},
                    {"op": "add", "path": "/status", "value": ISSUED_LEASE["status"]},
                ],
            ),
        ],
        [event(pod_ref(), "CredentialIssued", ISSUED_MSG_POD)],
    ),
    "a-refused-create-is-said-on-the-pod-and-retried": Row(
        {**READY, **pod()},
        put("pod", POD_UID),
        [("create", LEASES, ISSUED_LEASE)],
        [
            event(
                pod_ref(),
                "CredentialWriteFailed",
                "the operator could not write this pod's credential lease: 403 Forbidden: denied",
                "Warning",
            )
        ],
        prepare=lambda kube: kube.fail("create", LEASES, KubeError(403, "Forbidden", "denied")),
        retries=1,
    ),
}


@rows(LEASES_TABLE)
async def test_leases(row: Row) -> None:
    await check(row)


# -- Webhooks -----------------------------------------------------------------------------

MAY_GET: Call = (
    "create",
    SSAR,
    {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "namespace": "build",
                "verb": "get",
                "resource": "secrets",
                "name": "hook-key",
            }
        },
    },
)
HOOK_MSG = "deliveries are forwarded to Service listener port 8080"
HOOK_READY: JSON = {
    "observedGeneration": 1,
    "conditions": [cond("Ready", "True", "Ready", HOOK_MSG)],
}


def granted(kube: FakeKube) -> None:
    kube.answer("create", SSAR, {"status": {"allowed": True}}, times=5)


WEBHOOKS = {
    "ready-is-written-with-its-event": Row(
        {**namespace(), **webhook()},
        put("webhook", ("build", "hook")),
        [MAY_GET, status_patch(HOOK, HOOK_READY)],
        [
            event(
                {**binding_ref(), "kind": "PhabricatorWebhook", "name": "hook", "uid": "hook-uid"},
                "Ready",
                HOOK_MSG,
            )
        ],
        prepare=granted,
    ),
    "an-unchanged-condition-is-not-written": Row(
        {**namespace(), **webhook(HOOK_READY)},
        put("webhook", ("build", "hook")),
        [MAY_GET],
        prepare=granted,
    ),
}


@rows(WEBHOOKS)
async def test_webhooks(row: Row) -> None:
    await check(row)
