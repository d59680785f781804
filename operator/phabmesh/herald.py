"""Phorge's Herald webhooks on the wire: the payload as Phorge builds it, its signature, and
the checks a delivery must pass before it is forwarded (pure: no I/O, the clock passed in).

What Phorge sends (``HeraldWebhookWorker``): a POST with ``Content-Type: application/json``
whose body is ``PhutilJSON::encodeFormatted`` of

    {"object": {"type": <PHID type>, "phid": <PHID>},
     "triggers": [{"phid": ...}, ...],
     "action": {"test": bool, "silent": bool, "secure": bool, "epoch": <int>},
     "transactions": [{"phid": ...}, ...]}

(two-space indentation, ``": "`` after keys, a final newline), and the header
``X-Phabricator-Webhook-Signature``: the lower-case hex HMAC-SHA256 of that body with the
webhook's HMAC key (``PhabricatorHash::digestHMACSHA256``). ``epoch`` is when the request was
queued (``HeraldWebhookRequest``'s creation), so a retry carries the same body and signature.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

SIGNATURE_HEADER = "X-Phabricator-Webhook-Signature"
# The headers Phorge sends that a target may read, forwarded as they came.
FORWARDED_HEADERS = ("Content-Type", SIGNATURE_HEADER, "User-Agent")
PHID_CHARS = 64  # the longest PHID an audit line carries
# How far ahead of this clock an epoch may be (clocks differ a little); further ahead, a body
# would stay fresh, and held for the replay check, longer than the window.
FUTURE_SKEW = 60.0
MAX_EPOCH = 1 << 53  # beyond any real time, and within a float's exact integers

# Why a delivery is refused before it is forwarded, each with its HTTP status.
UNSIGNED = "unsigned"  # no signature header
BAD_SIGNATURE = "bad_signature"  # a signature that is not the body's with the key
MALFORMED = "malformed"  # signed, but not a Herald payload (no action.epoch, not JSON)
STALE = "stale"  # action.epoch outside the freshness window
REPLAYED = "replayed"  # the same signed body seen within the window
STATUSES = {UNSIGNED: 401, BAD_SIGNATURE: 403, MALFORMED: 400, STALE: 422, REPLAYED: 409}


class Rejected(Exception):
    """A delivery refused: ``reason`` (one of the constants above) and its HTTP status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = STATUSES[reason]


@dataclasses.dataclass(frozen=True)
class Delivery:
    """What a verified delivery says: its object, when Phorge queued it, and its digest."""

    object_phid: str
    object_type: str
    epoch: int
    test: bool
    digest: str  # SHA-256 of the body: the replay cache's key


def encode(value: Any) -> bytes:
    """``PhutilJSON::encodeFormatted``: indented by two spaces, slashes unescaped, non-ASCII
    escaped as ``json_encode`` does, and a final newline."""
    return (json.dumps(value, indent=2, ensure_ascii=True) + "\n").encode()


def payload(
    object_phid: str,
    *,
    epoch: int,
    triggers: Sequence[str] = (),
    transactions: Sequence[str] = (),
    test: bool = False,
    silent: bool = False,
    secure: bool = False,
) -> bytes:
    """The body Phorge sends for an edit of ``object_phid`` (its type is the PHID's
    second part, as ``phid_get_type``)."""
    parts = object_phid.split("-")
    object_type = parts[1] if len(parts) > 2 and parts[0] == "PHID" else "????"
    return encode(
        {
            "object": {"type": object_type, "phid": object_phid},
            "triggers": [{"phid": phid} for phid in triggers],
            "action": {"test": test, "silent": silent, "secure": secure, "epoch": epoch},
            "transactions": [{"phid": phid} for phid in transactions],
        }
    )


def sign(body: bytes, key: str) -> str:
    """The signature Phorge puts in :data:`SIGNATURE_HEADER`."""
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify(
    body: bytes, signature: str | None, key: str, *, now: float, freshness: float
) -> Delivery:
    """The delivery ``body`` carries if ``signature`` is its HMAC with ``key`` (compared in
    constant time) and its ``action.epoch`` is within ``freshness`` seconds of ``now``
    (either side: a clock ahead of ours is as suspect as one behind); else :class:`Rejected`.
    Nothing of the body is read before its signature is checked."""
    if not signature:
        raise Rejected(UNSIGNED, f"no {SIGNATURE_HEADER} header")
    given = signature.strip().lower().encode("ascii", "replace")  # no hex digest is otherwise
    if not hmac.compare_digest(sign(body, key).encode(), given):
        raise Rejected(BAD_SIGNATURE, f"{SIGNATURE_HEADER} does not match the body")
    try:
        data = json.loads(body)
        action = data["action"]
        epoch = action["epoch"]
        obj = data.get("object") or {}
        object_phid = str(obj.get("phid") or "")
        object_type = str(obj.get("type") or "")
        test = bool(action.get("test"))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Rejected(MALFORMED, "the body is not a Herald webhook payload") from None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < MAX_EPOCH:
        raise Rejected(MALFORMED, "action.epoch is not a time in seconds")
    if now - epoch > freshness or epoch - now > FUTURE_SKEW:
        raise Rejected(
            STALE,
            f"action.epoch {epoch} is {round(now - epoch)} s from now, outside the "
            f"freshness window ({round(freshness)} s back, {round(FUTURE_SKEW)} s ahead)",
        )
    return Delivery(object_phid, object_type, epoch, test, hashlib.sha256(body).hexdigest())


class ReplayCache:
    """Deliveries seen within the freshness window, per namespace and body digest; bounded
    per namespace, so that one namespace's deliveries never crowd out another's.

    A delivery is claimed before it is forwarded (so two copies at once cannot both pass)
    and released if it could not be delivered, so that Phorge's own retry (the same body)
    gets through. An entry is kept until its epoch leaves the window (at most the window
    and :data:`FUTURE_SKEW` from now): after that the freshness check refuses the body anyway.
    When a namespace's entries are all still live, its new delivery is refused (fails closed)
    rather than one forgotten that could then be replayed. Only correctly signed bodies are
    entered: a namespace that holds a webhook's key can fill its own share, and only that.
    """

    def __init__(self, per_namespace: int) -> None:
        self.per_namespace = per_namespace
        self._seen: dict[str, collections.OrderedDict[tuple[str, str], float]] = {}

    def __len__(self) -> int:
        return sum(len(seen) for seen in self._seen.values())

    def claim(
        self, namespace: str, webhook: str, delivery: Delivery, *, now: float, freshness: float
    ) -> None:
        """Enter ``delivery`` for ``webhook`` of ``namespace``, or raise :class:`Rejected`
        (replayed) or :class:`Full`."""
        self.claim_key(
            namespace,
            (webhook, delivery.digest),
            until=delivery.epoch + freshness,
            now=now,
            replayed="this delivery was already received (same signed body)",
        )

    def claim_key(
        self, namespace: str, key: tuple[str, str], *, until: float, now: float, replayed: str
    ) -> None:
        """Enter ``key`` of ``namespace`` until ``until``, or raise :class:`Rejected`
        (``replayed``: it is there) or :class:`Full`. Keys should be entered in about the
        order they expire (one cache per kind of key)."""
        seen = self._seen.setdefault(namespace, collections.OrderedDict())
        held = seen.get(key)
        if held is not None and held >= now:
            raise Rejected(REPLAYED, replayed)
        # Entries go in about the order they expire: drop the expired ones at the front.
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        if len(seen) >= self.per_namespace:
            raise Full(self.per_namespace)
        seen[key] = until

    def release(self, namespace: str, webhook: str, delivery: Delivery) -> None:
        """Forget a claimed delivery that was not delivered."""
        self.release_key(namespace, (webhook, delivery.digest))

    def release_key(self, namespace: str, key: tuple[str, str]) -> None:
        seen = self._seen.get(namespace)
        if seen is not None:
            seen.pop(key, None)
            if not seen:
                del self._seen[namespace]


class Full(Exception):
    def __init__(self, entries: int) -> None:
        super().__init__(
            f"{entries} deliveries of this namespace are held for replay checks; retry shortly"
        )
