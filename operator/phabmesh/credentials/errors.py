"""Why a credential was refused, or a key ring could not be read.

Messages say which check failed and never quote the token, a claim value or key
material. Every :class:`CredentialError` is permanent: retrying the same token
cannot help.
"""


class CredentialError(Exception):
    """The credential is not acceptable."""


class Malformed(CredentialError):
    """Not a compact JWS with the header and claims phabmesh writes (truncated, padded,
    non-canonical base64url, duplicate JSON keys, a claim of the wrong type), or not
    ``api-`` and 28 base32 characters."""


class UnsupportedAlgorithm(CredentialError):
    """``alg`` is not EdDSA (``none``, HS256 and the like are refused outright)."""


class UnknownKey(CredentialError):
    """``kid`` is missing or names no key phabmesh signs with or still verifies with."""


class BadSignature(CredentialError):
    """The signature does not verify: forged, or tampered with after signing."""


class UnknownCredential(CredentialError):
    """A Phorge-shaped credential whose locator and MAC match no lease the verifier holds:
    forged, mistyped, from another cluster, or its lease is long gone."""


class Expired(CredentialError):
    """``exp`` has passed (beyond the allowed clock skew), or, when minting, the lease has."""


class NotYetValid(CredentialError):
    """``nbf`` or ``iat`` lies in the future (beyond the allowed clock skew)."""


class WrongAudience(CredentialError):
    """``aud`` is not the expected audience."""


class WrongIssuer(CredentialError):
    """``iss`` is not the expected issuer."""


class KeyRingError(ValueError):
    """Signing-key material (a Secret's data) cannot be read or does not hold together."""
