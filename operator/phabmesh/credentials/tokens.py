"""Credentials: compact JWS (EdDSA) JWTs with phabmesh's claims.

Header ``{"alg": "EdDSA", "typ": "JWT", "kid": ...}``; claims ``iss``, ``sub``
(the Linkerd identity), ``aud``, ``iat``, ``nbf``, ``exp`` (never past the
lease's end), ``jti`` and ``pod``, ``pod_uid``, ``namespace``, ``binding``,
``bot``, ``bot_phid``, ``lease_uid``.

Minting goes through PyJWT. Verification is done here, strictly, because a JWT
library's leniency is attack surface: the token must be exactly three canonical
unpadded base64url segments; the header and payload JSON objects without
duplicate keys; the header exactly ``alg`` EdDSA, ``kid``, optional ``typ`` JWT
(no ``crit``, ``jku``, ``jwk``, ``x5u``, ``b64`` or anything else); the signature
64 bytes of Ed25519 from a key of the ring; every claim present with its type;
then issuer, audience and times against an injected clock and leeway.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import cachetools
import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phabmesh.clock import utcnow
from phabmesh.credentials import errors
from phabmesh.credentials.keys import ALGORITHM, KeyRing, b64url_decode

DEFAULT_LEEWAY = datetime.timedelta(seconds=30)
MAX_TOKEN = 8192  # characters; a phabmesh credential is well under 1 KiB
_STRING_CLAIMS = (
    "iss",
    "sub",
    "aud",
    "jti",
    "pod",
    "pod_uid",
    "namespace",
    "binding",
    "bot",
    "bot_phid",
    "lease_uid",
)
_TIME_CLAIMS = ("iat", "nbf", "exp")
CLAIMS = (*_STRING_CLAIMS[:3], *_TIME_CLAIMS, *_STRING_CLAIMS[3:])
_HEADER_FIELDS = frozenset({"alg", "kid", "typ"})
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class Claims:
    """A verified credential's content."""

    subject: str
    issuer: str
    audience: str
    issued_at: datetime.datetime
    not_before: datetime.datetime
    expires_at: datetime.datetime
    jti: str
    pod: str
    pod_uid: str
    namespace: str
    binding: str
    bot: str
    bot_phid: str
    lease_uid: str
    kid: str


def _ts(value: datetime.datetime, what: str) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return int(value.timestamp())


def lifetime(
    now: datetime.datetime, not_after: datetime.datetime, ttl: datetime.timedelta | None
) -> tuple[int, int]:
    """(issued, expiry) in Unix seconds for a credential minted ``now``: the expiry is
    ``not_after`` (the lease's end), or ``now + ttl`` if sooner, rounded down. Raises
    :class:`~.errors.Expired` if that is not after ``now`` (the lease has ended)."""
    issued = _ts(now, "now")
    expiry = _ts(not_after, "not_after")
    if ttl is not None:
        expiry = min(expiry, _ts(now + ttl, "now"))
    if expiry <= issued:
        raise errors.Expired("the lease has already ended")
    return issued, expiry


def mint(
    ring: KeyRing,
    *,
    issuer: str,
    audience: str,
    subject: str,
    now: datetime.datetime,
    not_after: datetime.datetime,
    pod: str,
    pod_uid: str,
    namespace: str,
    binding: str,
    bot: str,
    bot_phid: str,
    lease_uid: str,
    ttl: datetime.timedelta | None = None,
) -> str:
    """Sign a credential with the ring's current key.

    ``not_after`` is the lease's expiresAt: ``exp`` is ``now + ttl`` capped at it
    (or ``not_after`` itself without ``ttl``), rounded down to whole seconds, so
    never past the lease. Raises :class:`~.errors.Expired` if the lease has ended.
    """
    iat, exp = lifetime(now, not_after, ttl)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": uuid.uuid4().hex,
        "pod": pod,
        "pod_uid": pod_uid,
        "namespace": namespace,
        "binding": binding,
        "bot": bot,
        "bot_phid": bot_phid,
        "lease_uid": lease_uid,
    }
    key = ring.current
    return jwt.encode(
        claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.Malformed(f"credential {what} is not canonical base64url JSON") from exc
    if not isinstance(value, dict):
        raise errors.Malformed(f"credential {what} is not a JSON object")
    return value


@dataclasses.dataclass(frozen=True)
class _Parsed:
    kid: str
    signing_input: bytes
    payload_segment: str
    signature: bytes


def _parse(token: str) -> _Parsed:
    """Split and check the form and header; nothing is trusted yet."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise errors.Malformed("credential is not a compact JWS")
    parts = token.split(".")
    if len(parts) != 3 or not _SEGMENT.match(parts[0]):
        raise errors.Malformed("credential is not a compact JWS")
    head, body, sig = parts
    header = _json_object(head, "header")
    if header.get("alg") != ALGORITHM:
        raise errors.UnsupportedAlgorithm("credential algorithm is not EdDSA")
    if not _SEGMENT.match(body) or not _SEGMENT.match(sig):
        raise errors.Malformed("credential is not a compact JWS")
    if set(header) - _HEADER_FIELDS:
        raise errors.Malformed("credential header carries unexpected fields")
    if "typ" in header and header["typ"] != "JWT":
        raise errors.Malformed("credential header typ is not JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise errors.UnknownKey("credential names no signing key")
    try:
        signature = b64url_decode(sig)
    except ValueError as exc:
        raise errors.Malformed("credential signature is not canonical base64url") from exc
    if len(signature) != 64:
        raise errors.Malformed("credential signature has the wrong length")
    return _Parsed(kid, f"{head}.{body}".encode(), body, signature)


def _check_times(
    iat: datetime.datetime,
    nbf: datetime.datetime,
    exp: datetime.datetime,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> None:
    if now >= exp + leeway:
        raise errors.Expired("credential expired")
    if now + leeway < nbf or now + leeway < iat:
        raise errors.NotYetValid("credential not yet valid")


def _check(
    parsed: _Parsed,
    key: Ed25519PublicKey,
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> Claims:
    try:
        key.verify(parsed.signature, parsed.signing_input)
    except InvalidSignature as exc:
        raise errors.BadSignature("credential signature does not verify") from exc
    payload = _json_object(parsed.payload_segment, "payload")
    for claim in _STRING_CLAIMS:
        if not isinstance(payload.get(claim), str):
            raise errors.Malformed(f"credential claim {claim!r} is missing or not a string")
    times: dict[str, datetime.datetime] = {}
    for claim in _TIME_CLAIMS:
        value = payload.get(claim)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise errors.Malformed(f"credential claim {claim!r} is missing or not a number")
        try:
            times[claim] = datetime.datetime.fromtimestamp(value, datetime.UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise errors.Malformed(f"credential claim {claim!r} is out of range") from exc
    if payload["iss"] != issuer:
        raise errors.WrongIssuer("credential is from another issuer")
    if payload["aud"] != audience:
        raise errors.WrongAudience("credential is for another audience")
    _check_times(times["iat"], times["nbf"], times["exp"], now, leeway)
    return Claims(
        subject=payload["sub"],
        issuer=payload["iss"],
        audience=payload["aud"],
        issued_at=times["iat"],
        not_before=times["nbf"],
        expires_at=times["exp"],
        jti=payload["jti"],
        pod=payload["pod"],
        pod_uid=payload["pod_uid"],
        namespace=payload["namespace"],
        binding=payload["binding"],
        bot=payload["bot"],
        bot_phid=payload["bot_phid"],
        lease_uid=payload["lease_uid"],
        kid=parsed.kid,
    )


def verify(
    token: str,
    ring: KeyRing,
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime,
    leeway: datetime.timedelta = DEFAULT_LEEWAY,
) -> Claims:
    """Check a credential completely; raise a :class:`~.errors.CredentialError` saying why not.

    Checks run in this order, so the first failure names itself: form and header
    (Malformed, UnsupportedAlgorithm), key (UnknownKey), signature (BadSignature),
    claims' presence and types (Malformed), issuer, audience, expiry, not-before.
    """
    parsed = _parse(token)
    key = ring.find(parsed.kid)
    if key is None:
        raise errors.UnknownKey("credential signed by an unknown key")
    return _check(parsed, key.public_key, audience=audience, issuer=issuer, now=now, leeway=leeway)


def _jwk_key(jwk: Mapping[str, Any]) -> Ed25519PublicKey | None:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        return None
    try:
        raw = b64url_decode(str(jwk.get("x", "")))
    except ValueError:
        return None
    if len(raw) != 32:
        return None
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_with_jwks(
    token: str,
    document: Mapping[str, Any],
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime | None = None,
    leeway: datetime.timedelta = DEFAULT_LEEWAY,
) -> Claims:
    """Verify against a published JWKS document, as any outside validator would.

    ``now`` None reads the system clock (for outside callers); pass it everywhere else.
    """
    parsed = _parse(token)
    keys = document.get("keys")
    for jwk in keys if isinstance(keys, list) else ():
        if isinstance(jwk, Mapping) and jwk.get("kid") == parsed.kid:
            key = _jwk_key(jwk)
            if key is None:
                continue
            when = now if now is not None else utcnow()
            return _check(parsed, key, audience=audience, issuer=issuer, now=when, leeway=leeway)
    raise errors.UnknownKey("credential signed by a key the JWKS does not list")


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload without any check: for display and tests only, never for decisions."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise errors.Malformed("credential is not a compact JWS")
    return _json_object(parts[1], "payload")


def jwks(ring: KeyRing) -> dict[str, Any]:
    """Public keys only: the current one and those still trusted."""
    return {"keys": [key.jwk() for key in ring.keys]}


def discovery_document(issuer: str, jwks_uri: str) -> dict[str, Any]:
    """OpenID Provider Metadata (the parts that apply) for ``/.well-known/openid-configuration``."""
    return {
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
        "claims_supported": list(CLAIMS),
    }


class VerifiedCache:
    """Claims of credentials already verified in full, keyed by the exact credential text.

    A pod uses one credential for many calls: after the first, a call costs a lookup and
    the time checks (``exp``, ``nbf``, ``iat``), which are made on every use. Any other
    text (one changed character) misses and is verified in full. The cache is emptied
    whenever the key ring changes, holds at most ``size`` entries (oldest out first), and
    is only ever filled by :func:`verify`.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._items: cachetools.LRUCache[str, Claims] = cachetools.LRUCache(size)
        self._ring: KeyRing | None = None

    def __len__(self) -> int:
        return len(self._items)

    def verify(
        self,
        token: str,
        ring: KeyRing,
        *,
        audience: str,
        issuer: str,
        now: datetime.datetime,
        leeway: datetime.timedelta = DEFAULT_LEEWAY,
    ) -> Claims:
        if ring is not self._ring:
            self._items.clear()
            self._ring = ring
        claims = self._items.get(token)
        if claims is None or claims.audience != audience or claims.issuer != issuer:
            claims = verify(token, ring, audience=audience, issuer=issuer, now=now, leeway=leeway)
            self._items[token] = claims  # the least recently used out past ``size``
            return claims
        _check_times(claims.issued_at, claims.not_before, claims.expires_at, now, leeway)
        return claims
