"""Signing keys, credential mint and verify, JWKS. Knows nothing of kopf or Kubernetes.

Credentials are compact JWS (EdDSA over Ed25519) JWTs (:mod:`.tokens`), or tokens
shaped like Phorge's, MACed with keys derived from the same ring (:mod:`.phorge`). Keys,
the ring, its Secret form and rotation: :mod:`.keys`. Refusals: :mod:`.errors`.
"""

from phabmesh.credentials import phorge
from phabmesh.credentials.errors import (
    BadSignature,
    CredentialError,
    Expired,
    KeyRingError,
    Malformed,
    NotYetValid,
    UnknownCredential,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongIssuer,
)
from phabmesh.credentials.keys import KeyRing, SigningKey, rotate, thumbprint
from phabmesh.credentials.tokens import (
    Claims,
    VerifiedCache,
    discovery_document,
    jwks,
    mint,
    unverified_claims,
    verify,
    verify_with_jwks,
)

__all__ = [
    "BadSignature",
    "Claims",
    "CredentialError",
    "Expired",
    "KeyRing",
    "KeyRingError",
    "Malformed",
    "NotYetValid",
    "SigningKey",
    "UnknownCredential",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "VerifiedCache",
    "WrongAudience",
    "WrongIssuer",
    "discovery_document",
    "jwks",
    "mint",
    "phorge",
    "rotate",
    "thumbprint",
    "unverified_claims",
    "verify",
    "verify_with_jwks",
]
