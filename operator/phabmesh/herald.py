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
    if not hmac.compare_digest(sign(body, key).encode(), signature.strip().lower().encode()):
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
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise Rejected(MALFORMED, "action.epoch is not a whole number")
    if abs(now - epoch) > freshness:
        raise Rejected(
            STALE,
            f"action.epoch {epoch} is {round(now - epoch)} s from now, outside the "
            f"freshness window of {round(freshness)} s",
        )
    return Delivery(object_phid, object_type, epoch, test, hashlib.sha256(body).hexdigest())


class ReplayCache:
    """Deliveries seen within the freshness window, by webhook and body digest; bounded.

    A delivery is claimed before it is forwarded (so two copies at once cannot both pass)
    and released if it could not be delivered, so that Phorge's own retry (the same body)
    gets through. An entry is kept until its epoch leaves the window: after that the
    freshness check refuses the body anyway. When full of unexpired entries, a new delivery
    is refused (fails closed) rather than forgetting one that could then be replayed; only
    correctly signed bodies are ever entered, so only Phorge's own volume can fill it.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._until: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def _expire(self, now: float) -> None:
        for key in [k for k, until in self._until.items() if until < now]:
            del self._until[key]

    def claim(self, webhook: str, delivery: Delivery, *, now: float, freshness: float) -> None:
        """Enter ``delivery`` for ``webhook``, or raise :class:`Rejected` (replayed) or
        :class:`Full`."""
        key = (webhook, delivery.digest)
        until = self._until.get(key)
        if until is not None and until >= now:
            raise Rejected(REPLAYED, "this delivery was already received (same signed body)")
        if len(self._until) >= self.max_entries:
            self._expire(now)
            if len(self._until) >= self.max_entries:
                raise Full(self.max_entries)
        self._until[key] = delivery.epoch + freshness

    def release(self, webhook: str, delivery: Delivery) -> None:
        """Forget a claimed delivery that was not delivered."""
        self._until.pop((webhook, delivery.digest), None)


class Full(Exception):
    def __init__(self, entries: int) -> None:
        super().__init__(f"{entries} deliveries are held for replay checks; retry shortly")
