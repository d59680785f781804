"""Ed25519 signing keys with RFC 7638 ``kid``s, a key ring, and its rotation policy."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phabmesh.credentials.errors import CredentialError

SECRET_KEY = "keys.json"  # noqa: S105 - the Secret data key holding the ring, not a secret


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_x(key: Ed25519PublicKey) -> str:
    return b64url(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def thumbprint(x: str) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 public key (its ``x``)."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclasses.dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False, compare=False)
    created_at: datetime.datetime
    retired_at: datetime.datetime | None = None

    @classmethod
    def generate(cls, now: datetime.datetime) -> SigningKey:
        key = Ed25519PrivateKey.generate()
        return cls(thumbprint(public_x(key.public_key())), key, now)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": public_x(self.public_key),
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
        }


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """The key that signs now, and earlier keys still trusted for verification."""

    current: SigningKey
    previous: tuple[SigningKey, ...] = ()

    @classmethod
    def generate(cls, now: datetime.datetime) -> KeyRing:
        return cls(SigningKey.generate(now))

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        return (self.current, *self.previous)

    def find(self, kid: str) -> SigningKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def to_secret_data(self) -> dict[str, str]:
        """Kubernetes Secret ``data`` (base64 values)."""
        entries = []
        for key in self.keys:
            pem = key.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            entries.append(
                {
                    "kid": key.kid,
                    "createdAt": key.created_at.isoformat(),
                    "retiredAt": key.retired_at.isoformat() if key.retired_at else None,
                    "privateKey": pem.decode(),
                }
            )
        raw = json.dumps({"keys": entries}).encode()
        return {SECRET_KEY: base64.b64encode(raw).decode()}

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> KeyRing:
        try:
            parsed = json.loads(base64.b64decode(data[SECRET_KEY]))
            keys = []
            for entry in parsed["keys"]:
                private = serialization.load_pem_private_key(
                    entry["privateKey"].encode(), password=None
                )
                if not isinstance(private, Ed25519PrivateKey):
                    raise CredentialError("signing key is not Ed25519")
                retired = entry.get("retiredAt")
                keys.append(
                    SigningKey(
                        kid=str(entry["kid"]),
                        private_key=private,
                        created_at=datetime.datetime.fromisoformat(entry["createdAt"]),
                        retired_at=datetime.datetime.fromisoformat(retired) if retired else None,
                    )
                )
        except (KeyError, ValueError, TypeError) as exc:
            raise CredentialError(f"signing-key Secret unreadable: {type(exc).__name__}") from exc
        if not keys:
            raise CredentialError("signing-key Secret holds no keys")
        return cls(keys[0], tuple(keys[1:]))


def rotate(
    ring: KeyRing,
    now: datetime.datetime,
    rotate_every: datetime.timedelta,
    max_credential_ttl: datetime.timedelta,
) -> KeyRing:
    """The ring after rotation policy; ``ring`` itself when nothing is due.

    A new key signs once the current one is ``rotate_every`` old; a retired key
    stays for verification until every credential it can have signed has expired
    (``retired_at + max_credential_ttl``).
    """
    current, previous = ring.current, list(ring.previous)
    changed = False
    if now - current.created_at >= rotate_every:
        previous.insert(0, dataclasses.replace(current, retired_at=now))
        current = SigningKey.generate(now)
        changed = True
    kept = [k for k in previous if k.retired_at is None or k.retired_at + max_credential_ttl > now]
    if len(kept) != len(previous):
        changed = True
    return KeyRing(current, tuple(kept)) if changed else ring
