"""Credentials: compact JWS (EdDSA) JWTs with phabmesh's claims.

Header ``{"alg": "EdDSA", "typ": "JWT", "kid": ...}``; claims ``iss``, ``sub``
(the Linkerd identity), ``aud``, ``iat``, ``nbf``, ``exp`` (never past the
lease's end), ``jti`` and ``pod``, ``pod_uid``, ``namespace``, ``binding``,
``bot``, ``bot_phid``, ``lease_uid``. Verification accepts EdDSA only, from a
known ``kid``, and checks every claim against an injected clock.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phabmesh.credentials import errors
from phabmesh.credentials.keys import KeyRing

ALGORITHM = "EdDSA"
_REQUIRED = (
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "pod",
    "pod_uid",
    "namespace",
    "binding",
    "bot",
    "lease_uid",
)
_MAX_TOKEN = 8192
# Strict base64url segments: no padding, no whitespace, nothing a lenient decoder forgives.
_COMPACT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@dataclasses.dataclass(frozen=True)
class Claims:
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


def _ts(value: datetime.datetime) -> int:
    return int(value.timestamp())


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
) -> str:
    """Sign a credential with the ring's current key; ``exp`` is ``not_after``, never later."""
    if not_after <= now:
        raise errors.Expired("the lease has already ended")
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": _ts(now),
        "nbf": _ts(now),
        "exp": _ts(not_after),  # truncation rounds down: never past the lease
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


def _header(token: str) -> dict[str, Any]:
    if len(token) > _MAX_TOKEN or not _COMPACT.match(token):
        raise errors.Malformed("credential is not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as exc:
        raise errors.Malformed("credential header is unreadable") from exc
    if header.get("alg") != ALGORITHM:
        raise errors.UnsupportedAlgorithm(f"algorithm {header.get('alg')!r} is not accepted")
    if set(header) - {"alg", "typ", "kid"}:
        raise errors.Malformed("credential header carries unexpected fields")
    return header


def _decode(
    token: str,
    key: Ed25519PublicKey,
    kid: str,
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime,
    leeway: datetime.timedelta,
) -> Claims:
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={
                "verify_exp": False,  # checked below against the injected clock
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "require": list(_REQUIRED),
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise errors.BadSignature("signature does not verify") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise errors.Malformed(f"claim {exc.claim!r} is missing") from exc
    except jwt.InvalidTokenError as exc:
        raise errors.Malformed(f"credential is unreadable ({type(exc).__name__})") from exc
    if payload["aud"] != audience:
        raise errors.WrongAudience("credential is for another audience")
    if payload["iss"] != issuer:
        raise errors.WrongIssuer("credential is from another issuer")
    try:
        exp, nbf, iat = (
            datetime.datetime.fromtimestamp(int(payload[c]), datetime.UTC)
            for c in ("exp", "nbf", "iat")
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise errors.Malformed("time claims are not numbers") from exc
    if now >= exp + leeway:
        raise errors.Expired("credential expired")
    if now + leeway < nbf or now + leeway < iat:
        raise errors.NotYetValid("credential not yet valid")
    return Claims(
        subject=str(payload["sub"]),
        issuer=str(payload["iss"]),
        audience=str(payload["aud"]),
        issued_at=iat,
        not_before=nbf,
        expires_at=exp,
        jti=str(payload["jti"]),
        pod=str(payload["pod"]),
        pod_uid=str(payload["pod_uid"]),
        namespace=str(payload["namespace"]),
        binding=str(payload["binding"]),
        bot=str(payload["bot"]),
        bot_phid=str(payload.get("bot_phid") or ""),
        lease_uid=str(payload["lease_uid"]),
        kid=kid,
    )


def verify(
    token: str,
    ring: KeyRing,
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime,
    leeway: datetime.timedelta = datetime.timedelta(seconds=30),
) -> Claims:
    """Check a credential completely; raise a :class:`CredentialError` saying why not."""
    header = _header(token)
    key = ring.find(str(header.get("kid", "")))
    if key is None:
        raise errors.UnknownKey("credential signed by an unknown key")
    return _decode(
        token, key.public_key, key.kid, audience=audience, issuer=issuer, now=now, leeway=leeway
    )


def verify_with_jwks(
    token: str,
    document: Mapping[str, Any],
    *,
    audience: str,
    issuer: str,
    now: datetime.datetime | None = None,
    leeway: datetime.timedelta = datetime.timedelta(seconds=30),
) -> Claims:
    """Verify against a published JWKS document, as any outside validator would."""
    header = _header(token)
    kid = str(header.get("kid", ""))
    for jwk in document.get("keys") or []:
        if jwk.get("kid") == kid and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            raw = base64.urlsafe_b64decode(str(jwk["x"]) + "=" * (-len(str(jwk["x"])) % 4))
            key = Ed25519PublicKey.from_public_bytes(raw)
            when = now or datetime.datetime.now(datetime.UTC)
            return _decode(
                token, key, kid, audience=audience, issuer=issuer, now=when, leeway=leeway
            )
    raise errors.UnknownKey("credential signed by a key the JWKS does not list")


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload without any check: for display and tests only, never for decisions."""
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(token.split(".")[1] + "=" * (-len(token.split(".")[1]) % 4))
    )
    return claims


def jwks(ring: KeyRing) -> dict[str, Any]:
    """Public keys only: the current one and those still trusted."""
    return {"keys": [key.jwk() for key in ring.keys]}


def discovery_document(issuer: str, jwks_uri: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [ALGORITHM],
        "claims_supported": [*_REQUIRED, "bot_phid"],
    }
