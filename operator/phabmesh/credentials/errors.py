"""Why a credential was refused. Messages say which check failed and never quote it."""


class CredentialError(Exception):
    """The credential is not acceptable. Permanent: retrying the same token cannot help."""


class Malformed(CredentialError):
    """Not a compact JWS with the claims phabmesh writes (truncated, padded, garbled)."""


class UnsupportedAlgorithm(CredentialError):
    """``alg`` is not EdDSA (``none``, HS256 and the like are refused outright)."""


class UnknownKey(CredentialError):
    """``kid`` names no key phabmesh signs with or still verifies with."""


class BadSignature(CredentialError):
    """The signature does not verify: forged, or tampered with after signing."""


class Expired(CredentialError):
    """``exp`` has passed (beyond the allowed clock skew)."""


class NotYetValid(CredentialError):
    """``nbf`` or ``iat`` lies in the future (beyond the allowed clock skew)."""


class WrongAudience(CredentialError):
    """``aud`` is not the gateway's audience."""


class WrongIssuer(CredentialError):
    """``iss`` is not phabmesh's issuer."""
