"""Harbormaster builds with "Make HTTP Request" steps, as Phorge runs them, and the two Conduit
methods about their targets (``harbormaster.target.search``, ``harbormaster.sendmessage``).
What Phorge sends and answers was recorded from a real Phorge (tests/conduit/harbormaster/).

A build here has one target, for one HTTP Request step. Running it: the target is Building,
the step's URI gets its variables (URL-encoded, as ``vurisprintf`` does), the request goes out
with the step's method, no body, Phorge's headers and the basic credential if the step has one,
60 s at most; then the target is Waiting for a message (or Passed when the step does not wait),
or Failed when the request failed. A ``pass`` or ``fail`` message to a target finishes it and
its build at once (Phorge's daemons do it a moment later).
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import string
from typing import Any
from urllib.parse import quote

import aiohttp

from phabmesh.dev.conduit.hooks import USER_AGENT, Delivery
from phabmesh.dev.conduit.php import Failure

REQUEST_SECONDS = 60.0  # HarbormasterHTTPRequestBuildStepImplementation: ->setTimeout(60)
BUILDING, WAITING = "target/building", "target/waiting"
PASSED, FAILED = "target/passed", "target/failed"
STATUS_NAMES = {
    "target/pending": "Pending",
    BUILDING: "Building",
    WAITING: "Waiting for Message",
    PASSED: "Passed",
    FAILED: "Failed",
    "target/aborted": "Aborted",
}
FINISHING = {"pass": PASSED, "fail": FAILED}


def phid(kind: str) -> str:
    return f"PHID-{kind}-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(20))


@dataclasses.dataclass(frozen=True)
class Step:
    """A "Make HTTP Request" step: its URI (with ``${...}`` variables), method, basic
    credential (username, password) and whether it waits for a message."""

    uri: str
    method: str = "POST"
    credential: tuple[str, str] | None = None
    wait: bool = True
    name: str = "make an HTTP request"
    phid: str = dataclasses.field(default_factory=lambda: phid("HMCS"))


@dataclasses.dataclass
class Target:
    id: int
    phid: str
    build_id: int
    build_phid: str
    step: Step
    status: str
    created: int
    started: int | None = None
    completed: int | None = None
    messages: list[str] = dataclasses.field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {
            "name": self.step.name,
            "buildPHID": self.build_phid,
            "buildStepPHID": self.step.phid,
            "status": {"value": self.status, "name": STATUS_NAMES[self.status]},
            "epochStarted": self.started,
            "epochCompleted": self.completed,
            "buildGeneration": 1,
            "dateCreated": self.created,
            "dateModified": self.completed or self.started or self.created,
            "policy": {"view": "users"},
        }


def variables(target: Target, revision: int | None) -> dict[str, str]:
    """The build variables a step's URI may use (HarbormasterBuild::getBuildVariables)."""
    return {
        "target.phid": target.phid,
        "build.id": str(target.build_id),
        "buildable.revision": "" if revision is None else str(revision),
        "step.timestamp": str(target.started),
    }


def request_url(uri: str, values: dict[str, str]) -> str:
    """``uri`` with each ``${name}`` replaced by its URL-encoded value."""
    for name, value in values.items():
        uri = uri.replace("${" + name + "}", quote(value, safe=""))
    return uri


def request_headers(step: Step) -> dict[str, str]:
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": "*/*",
        "Accept-Encoding": "gzip",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    if step.credential is not None:
        pair = ":".join(step.credential).encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    return headers


async def send(method: str, url: str, headers: dict[str, str]) -> Delivery:
    """The step's request as Phorge's HTTPSFuture makes it; its answer (status 0: none)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                url,
                data=b"",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS),
                allow_redirects=False,
                skip_auto_headers=("Content-Type",),
            ) as answer,
        ):
            return Delivery(url, b"", headers, answer.status, await answer.text())
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Delivery(url, b"", headers, 0, f"{type(exc).__name__}: {exc}")


class Builds:
    """Builds and their targets, by PHID."""

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}
        self.builds: dict[int, str] = {}  # build id -> buildStatus value

    def start(self, step: Step, now: int) -> Target:
        build_id = len(self.builds) + 1
        self.builds[build_id] = "building"
        target = Target(
            id=len(self.targets) + 1,
            phid=phid("HMBT"),
            build_id=build_id,
            build_phid=phid("HMBD"),
            step=step,
            status=BUILDING,
            created=now,
            started=now,
        )
        self.targets[target.phid] = target
        return target

    def requested(self, target: Target, delivery: Delivery, now: int) -> None:
        """The step's request returned: the target waits, passes, or fails."""
        if delivery.status == 0 or delivery.status >= 400:
            self._finish(target, FAILED, now)
        elif target.step.wait:
            target.status = WAITING
        else:
            self._finish(target, PASSED, now)

    def _finish(self, target: Target, status: str, now: int) -> None:
        target.status, target.completed = status, now
        self.builds[target.build_id] = "passed" if status == PASSED else "failed"

    def search(self, params: dict[str, Any]) -> dict[str, Any]:
        """``harbormaster.target.search`` with a ``phids`` constraint."""
        constraints = params.get("constraints") or {}
        wanted = constraints.get("phids") if isinstance(constraints, dict) else None
        if isinstance(wanted, dict):  # a PHP list sent as a form
            wanted = list(wanted.values())
        found = [t for t in self.targets.values() if wanted is None or t.phid in (wanted or [])]
        return {
            "data": [
                {
                    "id": t.id,
                    "type": "HMBT",
                    "phid": t.phid,
                    "fields": t.fields(),
                    "attachments": {},
                }
                for t in found
            ],
            "maps": {},
            "query": {"queryKey": None},
            "cursor": {"limit": 100, "after": None, "before": None, "order": None},
        }

    def send_message(self, params: dict[str, Any], now: int) -> None:
        """``harbormaster.sendmessage`` to a build target: ``pass`` or ``fail`` finish it
        (a finished target keeps its status, as Phorge's daemons ignore the message)."""
        receiver = params.get("receiver") or params.get("buildTargetPHID")
        target = self.targets.get(str(receiver))
        if target is None:
            raise Failure(
                "ERR-CONDUIT-CORE", f'Unable to load object "{receiver}" to receive message.'
            )
        kind = str(params.get("type"))
        target.messages.append(kind)
        if kind in FINISHING and target.status in (BUILDING, WAITING):
            self._finish(target, FINISHING[kind], now)
