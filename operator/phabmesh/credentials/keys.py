"""Ed25519 signing keys with RFC 7638 ``kid``s, a key ring, and its rotation policy.

The ring is stored as Kubernetes Secret ``data``: one entry, :data:`SECRET_KEY`,
holding (base64, as Secret data is) a JSON document listing every key with its
``kid``, ``createdAt``, ``retiredAt`` and its private key as unencrypted PKCS#8 PEM.
The current (signing) key comes first.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phabmesh.credentials.errors import KeyRingError

SECRET_KEY = "keys.json"  # noqa: S105 - the Secret data key holding the ring, not a secret
ALGORITHM = "EdDSA"
PHORGE_TOKEN_INFO = b"phabmesh phorge-token v1"  # HKDF info of the Phorge-shaped tokens' MAC key


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: no padding, no whitespace, no non-canonical last character.

    Raises ValueError. Canonical form matters: a lenient decoder lets several
    spellings of one token verify, so a token string would no longer be unique.
    """
    if "=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc
    if b64url(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def public_x(key: Ed25519PublicKey) -> str:
    """The JWK ``x`` of an Ed25519 public key."""
    return b64url(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def thumbprint(x: str) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 public key (its ``x``), used as ``kid``."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def _aware(value: datetime.datetime, what: str) -> datetime.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return value


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key; its private half never appears in repr or comparisons."""

    kid: str
    private_key: Ed25519PrivateKey = dataclasses.field(repr=False, compare=False)
    created_at: datetime.datetime
    retired_at: datetime.datetime | None = None

    @classmethod
    def generate(cls, now: datetime.datetime) -> SigningKey:
        return cls.from_private_key(Ed25519PrivateKey.generate(), _aware(now, "now"))

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey, created_at: datetime.datetime) -> SigningKey:
        return cls(thumbprint(public_x(key.public_key())), key, created_at)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @functools.cached_property
    def phorge_mac_key(self) -> bytes:
        """The MAC key of Phorge-shaped credentials (:mod:`.phorge`): HKDF-SHA256 of this key.

        Derived, never stored: it rotates and retires with the signing key. Secret.
        """
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PHORGE_TOKEN_INFO).derive(
            seed
        )

    def jwk(self) -> dict[str, str]:
        """The public JWK (RFC 8037): no private part."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": public_x(self.public_key),
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }

    def _entry(self) -> dict[str, Any]:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "kid": self.kid,
            "createdAt": self.created_at.isoformat(),
            "retiredAt": self.retired_at.isoformat() if self.retired_at else None,
            "privateKey": pem.decode(),
        }

    @classmethod
    def _from_entry(cls, entry: Mapping[str, Any]) -> SigningKey:
        private = serialization.load_pem_private_key(
            str(entry["privateKey"]).encode(), password=None
        )
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyRingError("a signing key in the Secret is not Ed25519")
        key = cls.from_private_key(
            private, _aware(datetime.datetime.fromisoformat(entry["createdAt"]), "createdAt")
        )
        if entry.get("kid") != key.kid:
            raise KeyRingError("a signing key's kid does not match its public key")
        retired = entry.get("retiredAt")
        if retired:
            key = dataclasses.replace(
                key, retired_at=_aware(datetime.datetime.fromisoformat(retired), "retiredAt")
            )
        return key


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
        """Kubernetes Secret ``data`` (base64 values). Holds private keys: never log it."""
        raw = json.dumps({"keys": [key._entry() for key in self.keys]}).encode()
        return {SECRET_KEY: base64.b64encode(raw).decode()}

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> KeyRing:
        """Read :meth:`to_secret_data`'s output back; :class:`KeyRingError` saying what is wrong."""
        if SECRET_KEY not in data:
            raise KeyRingError(f"the signing-key Secret has no {SECRET_KEY!r}")
        try:
            parsed = json.loads(base64.b64decode(data[SECRET_KEY], validate=True))
            keys = [SigningKey._from_entry(entry) for entry in parsed["keys"]]
        except KeyRingError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            # The exception's text could quote key material: name only its kind.
            raise KeyRingError(
                f"the signing-key Secret is unreadable ({type(exc).__name__})"
            ) from None
        if not keys:
            raise KeyRingError("the signing-key Secret holds no keys")
        if len({k.kid for k in keys}) != len(keys):
            raise KeyRingError("the signing-key Secret holds one key twice")
        return cls(keys[0], tuple(keys[1:]))


def rotate(
    ring: KeyRing,
    now: datetime.datetime,
    rotate_every: datetime.timedelta,
    max_credential_ttl: datetime.timedelta,
    skew: datetime.timedelta = datetime.timedelta(0),
) -> KeyRing:
    """The ring after the rotation policy; ``ring`` itself (same object) when nothing is due.

    A new key signs once the current one is ``rotate_every`` old; the old one is
    kept, stamped ``retired_at = now``. A retired key is dropped only once every
    credential it can have signed has expired for every verifier:
    ``retired_at + max_credential_ttl + skew < now`` (pass the verifiers' leeway as
    ``skew``). A previous key without ``retired_at`` is stamped now and kept.
    """
    _aware(now, "now")
    current, previous = ring.current, list(ring.previous)
    changed = False
    if now - current.created_at >= rotate_every:
        previous.insert(0, dataclasses.replace(current, retired_at=now))
        current = SigningKey.generate(now)
        changed = True
    kept: list[SigningKey] = []
    for key in previous:
        if key.retired_at is None:
            kept.append(dataclasses.replace(key, retired_at=now))
            changed = True
        elif key.retired_at + max_credential_ttl + skew >= now:
            kept.append(key)
        else:
            changed = True
    return KeyRing(current, tuple(kept)) if changed else ring
