"""Harbormaster "Make HTTP Request" build steps, as Phorge makes them, and what the gateway
checks of one (pure; the gateway does the I/O).

What Phorge sends (``HarbormasterHTTPRequestBuildStepImplementation``, recorded from a real
Phorge in tests/conduit/harbormaster/): the step's URI with its variables substituted and
URL-encoded (``${target.phid}``, ``${build.id}``, ``${buildable.revision}``...), with the
step's method (POST by default), no body, ``Content-Type: application/x-www-form-urlencoded``,
HTTP basic authentication when the step has a credential, 60 s at most. The build target's
status while the request is made is ``target/building``; once the request returned, the step
moves it to ``target/waiting`` ("Wait For Message") or ``target/passed``.

So a call is honoured only for a target that is ``target/building`` now, as the bot sees it
through ``harbormaster.target.search``; a call replayed later finds it waiting or finished.
Within the request's own 60 s, the gateway claims the target (one call per target).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping
from typing import Any

TARGET_PARAMETER = "target"  # the query parameter that carries ${target.phid}
TARGET_PHID = re.compile(r"PHID-HMBT-[a-z0-9]{20}")
# Forwarded to the webhook's target, once verified: the build target's PHID.
TARGET_HEADER = "X-Phabmesh-Build-Target"
SEARCH_METHOD = "harbormaster.target.search"
METHODS = frozenset({"POST", "GET", "PUT", "DELETE"})  # the step's "HTTP Method" choices
REQUEST_SECONDS = 60.0  # HarbormasterHTTPRequestBuildStepImplementation: ->setTimeout(60)
# How long a target stays claimed after its call: past the step's own timeout, Phorge has
# moved the target on from Building, and the Conduit check refuses the call anyway.
CLAIM_SECONDS = 2 * REQUEST_SECONDS
FORWARDED_HEADERS = ("Content-Type", "User-Agent")

BUILDING = "target/building"
WAITING = "target/waiting"
FINISHED = frozenset({"target/passed", "target/failed", "target/aborted"})

# Refusal reasons (metrics outcomes, audit lines).
NO_CREDENTIAL = "no_credential"
BAD_CREDENTIAL = "bad_credential"
NO_TARGET = "no_target"
UNKNOWN_TARGET = "unknown_target"
FINISHED_TARGET = "finished_target"
NOT_BUILDING = "not_building"
REPLAYED = "replayed"
PHABRICATOR_ERROR = "phabricator_error"
REASONS = frozenset(
    {
        NO_CREDENTIAL,
        BAD_CREDENTIAL,
        NO_TARGET,
        UNKNOWN_TARGET,
        FINISHED_TARGET,
        NOT_BUILDING,
        REPLAYED,
        PHABRICATOR_ERROR,
    }
)


class Refused(Exception):
    """A call refused: ``reason`` (one of the constants above) and its HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def target_phid(query: Mapping[str, str]) -> str:
    """The build target's PHID from the call's query (``?target=${target.phid}``), given
    once."""
    getall = getattr(query, "getall", None)  # a MultiDict: the same name more than once
    if getall is not None and len(getall(TARGET_PARAMETER, [])) > 1:
        raise Refused(400, NO_TARGET, "more than one ?target= in the URI: give it once")
    value = query.get(TARGET_PARAMETER)
    if value is None:
        raise Refused(
            400,
            NO_TARGET,
            "no ?target= in the URI: end the build step's URI with ?target=${target.phid}",
        )
    if not TARGET_PHID.fullmatch(value):
        raise Refused(400, NO_TARGET, "?target= is not a build target PHID (PHID-HMBT-...)")
    return value


def check_basic(authorization: str | None, username: str, password: str) -> None:
    """The call's basic credential against the webhook's (in constant time)."""
    if authorization is None or not authorization.startswith("Basic "):
        raise Refused(
            401,
            NO_CREDENTIAL,
            "no basic credential: give the build step the Passphrase credential of this "
            "webhook's Secret",
        )
    try:
        given = base64.b64decode(authorization[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        given = b""
    user, _, secret = given.partition(b":")
    good = hmac.compare_digest(user, username.encode()) & hmac.compare_digest(
        secret, password.encode()
    )
    if not good:
        raise Refused(403, BAD_CREDENTIAL, "the basic credential does not match this webhook's")


def search_params(phid: str) -> dict[str, str]:
    """The form of ``harbormaster.target.search`` for one target (the token is added by the
    caller)."""
    return {"constraints[phids][0]": phid}


def judge_search(answer: Any, phid: str) -> None:
    """Whether ``harbormaster.target.search``'s answer lets the call through: the target
    exists, the bot sees it, and Phorge is making its request now (Building)."""
    if not isinstance(answer, dict):
        raise Refused(502, PHABRICATOR_ERROR, "Phabricator's answer is not a Conduit answer")
    if answer.get("error_code"):
        raise Refused(
            502,
            PHABRICATOR_ERROR,
            f"Phabricator refused the check of the build target: {answer.get('error_code')}: "
            f"{str(answer.get('error_info'))[:200]}",
        )
    data = (answer.get("result") or {}).get("data")
    if not isinstance(data, list):
        raise Refused(502, PHABRICATOR_ERROR, "Phabricator's answer has no result.data")
    found = next((d for d in data if isinstance(d, dict) and d.get("phid") == phid), None)
    if found is None:
        raise Refused(
            404,
            UNKNOWN_TARGET,
            f"no build target {phid} that the webhook's bot can see",
        )
    status = ((found.get("fields") or {}).get("status") or {}).get("value")
    if status == BUILDING:
        return
    if status == WAITING:
        raise Refused(
            409, REPLAYED, f"build target {phid} was already called (it waits for a message)"
        )
    if status in FINISHED:
        raise Refused(409, FINISHED_TARGET, f"build target {phid} has finished ({status})")
    raise Refused(409, NOT_BUILDING, f"build target {phid} is not running ({status})")
