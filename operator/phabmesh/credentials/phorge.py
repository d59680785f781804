"""Credentials shaped like Phorge API tokens: ``api-`` and 28 characters of ``[a-z2-7]``.

A client that accepts a Phorge token (``arc``, ``phabfive``'s ``^[a-zA-Z0-9-]{32}$``)
accepts these. The 28 characters are RFC 4648 base32 (lower case), three fields:

- **locator** (6 characters, 30 bits): a hash of the lease's UID. The gateway's
  lease watch indexes every lease by it, so a call costs a dictionary lookup.
  It is not secret and carries no authority.
- **expiry** (7 characters, 35 bits): Unix seconds, never past the lease's
  ``expiresAt`` (and capped by the maximum TTL, as :func:`.tokens.mint`).
- **MAC** (15 characters, 75 bits): HMAC-SHA256, truncated, over the version,
  a digest of the lease's immutable facts (:func:`lease_digest`: UID, pod UID,
  namespace, binding, bot, identity) and the expiry. The key is derived from a
  signing key of the ring (:attr:`.keys.SigningKey.phorge_mac_key`), so these
  rotate with the signing keys, and a retired key verifies until it is dropped.

A verifier needs the lease (its facts are not in the token) and the ring. Every
input has exactly one spelling (no padding, no spare bits), so a changed
character never verifies. Knows nothing of Kubernetes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from phabmesh.credentials import errors, tokens
from phabmesh.credentials.keys import KeyRing, SigningKey

PREFIX = "api-"
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
LOCATOR_CHARS, EXPIRY_CHARS, MAC_CHARS = 6, 7, 15
LENGTH = len(PREFIX) + LOCATOR_CHARS + EXPIRY_CHARS + MAC_CHARS  # 32, like a Phorge token
MAC_BITS = 5 * MAC_CHARS
VERSION = b"phabmesh phorge-token v1"
_LOCATOR_DOMAIN = b"phabmesh lease locator v1\x00"
_TO_INT_DIGITS = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")  # int(x, 32)
_SHAPE = re.compile(r"api-[a-z2-7]{28}")  # fixed length, no repetition of groups: linear
_MAX_EXPIRY = 32**EXPIRY_CHARS - 1  # the year 3058

T = TypeVar("T")


def _encode(value: int, chars: int) -> str:
    out = []
    for _ in range(chars):
        out.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _decode(text: str) -> int:
    """Only for text of our alphabet (checked by :func:`parse` first)."""
    return int(text.translate(_TO_INT_DIGITS), 32)


def _truncated(digest: bytes, bits: int) -> int:
    return int.from_bytes(digest, "big") >> (8 * len(digest) - bits)


def looks_like(token: str) -> bool:
    """Shaped like a Phorge token (``api-`` and 28 characters): not checked any further."""
    return len(token) == LENGTH and token.startswith(PREFIX)


def locator(lease_uid: str) -> str:
    """Where a verifier finds the lease: 30 bits of a hash of its UID."""
    digest = hashlib.sha256(_LOCATOR_DOMAIN + lease_uid.encode()).digest()
    return _encode(_truncated(digest, 5 * LOCATOR_CHARS), LOCATOR_CHARS)


def lease_digest(
    *, lease_uid: str, pod_uid: str, namespace: str, binding: str, bot: str, identity: str
) -> bytes:
    """SHA-256 over the lease's immutable facts, each length-prefixed (one encoding only)."""
    hasher = hashlib.sha256(VERSION + b"\x00")
    for field in (lease_uid, pod_uid, namespace, binding, bot, identity):
        data = field.encode()
        hasher.update(len(data).to_bytes(4, "big") + data)
    return hasher.digest()


def _mac(key: SigningKey, digest: bytes, expiry: int) -> bytes:
    """The MAC's 75 bits, as 10 bytes (right-aligned)."""
    message = VERSION + b"\x00" + digest + expiry.to_bytes(8, "big")
    full = hmac.digest(key.phorge_mac_key, message, "sha256")
    return _truncated(full[:10], MAC_BITS).to_bytes(10, "big")


def mint(
    ring: KeyRing,
    *,
    lease_uid: str,
    digest: bytes,
    now: datetime.datetime,
    not_after: datetime.datetime,
    ttl: datetime.timedelta | None = None,
) -> str:
    """A token for the lease whose :func:`lease_digest` is ``digest``, MACed with the current key.

    The expiry is ``not_after`` (the lease's expiresAt) or ``now + ttl`` if sooner, in
    whole seconds. Raises :class:`~.errors.Expired` if the lease has already ended.
    """
    _, expiry = tokens.lifetime(now, not_after, ttl)
    if expiry > _MAX_EXPIRY:
        raise ValueError("expiry out of range")
    mac = int.from_bytes(_mac(ring.current, digest, expiry), "big")
    return PREFIX + locator(lease_uid) + _encode(expiry, EXPIRY_CHARS) + _encode(mac, MAC_CHARS)


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A token's fields, none of them trusted yet."""

    locator: str
    expiry: int  # Unix seconds
    mac: bytes = dataclasses.field(repr=False)  # 75 bits, right-aligned in 10 bytes

    @property
    def expires_at(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.expiry, datetime.UTC)


def parse(token: str) -> Parsed:
    """Split a token; :class:`~.errors.Malformed` unless it is exactly our shape."""
    if not isinstance(token, str) or not looks_like(token):
        raise errors.Malformed("credential is not api- and 28 characters")
    if not _SHAPE.fullmatch(token):
        raise errors.Malformed("credential has characters outside base32 (a-z, 2-7)")
    body = token[len(PREFIX) :]
    loc, rest = body[:LOCATOR_CHARS], body[LOCATOR_CHARS:]
    mac = _decode(rest[EXPIRY_CHARS:]).to_bytes(10, "big")
    return Parsed(loc, _decode(rest[:EXPIRY_CHARS]), mac)


def match(parsed: Parsed, digest: bytes, ring: KeyRing) -> SigningKey | None:
    """The key of the ring whose MAC over ``digest`` and the expiry is the token's, if any."""
    for key in ring.keys:
        if hmac.compare_digest(_mac(key, digest, parsed.expiry), parsed.mac):
            return key
    return None


def check_expiry(parsed: Parsed, now: datetime.datetime, leeway: datetime.timedelta) -> None:
    if now.timestamp() >= parsed.expiry + leeway.total_seconds():
        raise errors.Expired("credential expired")


@dataclasses.dataclass(frozen=True)
class Verified(Generic[T]):
    """Who a verified token belongs to (``holder``: what the caller's lookup returned)."""

    holder: T
    expires_at: datetime.datetime
    kid: str


def verify(
    token: str,
    ring: KeyRing,
    candidates: Callable[[str], Iterable[tuple[T, bytes]]],
    *,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> Verified[T]:
    """Check a token completely; raise a :class:`~.errors.CredentialError` saying why not.

    ``candidates(locator)`` gives the holders (leases) filed under the token's locator,
    each with its :func:`lease_digest`: usually one, none for a forged token. Checks, in
    order: shape (Malformed), a holder and key whose MAC matches (UnknownCredential), expiry.
    The work is one MAC per candidate and key of the ring.
    """
    parsed = parse(token)
    for holder, digest in candidates(parsed.locator):
        key = match(parsed, digest, ring)
        if key is not None:
            check_expiry(parsed, now, leeway)
            return Verified(holder, parsed.expires_at, key.kid)
    raise errors.UnknownCredential("credential matches no lease")
