"""Credentials shaped like Phorge tokens: shape, round trip, every way one can be wrong."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from phabmesh import credentials, logs
from phabmesh.credentials import phorge
from phabmesh.credentials.keys import SigningKey, b64url_decode

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LEASE_END = T0 + datetime.timedelta(minutes=15)
SKEW = datetime.timedelta(seconds=30)
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"  # RFC 8037 A.1's private key
RING = credentials.KeyRing.generate(T0)

PHORGE_SHAPE = re.compile(r"^api-[a-z0-9]{28}$")
PHABFIVE_SHAPE = re.compile(r"^[a-zA-Z0-9-]{32}$")


@dataclasses.dataclass(frozen=True)
class Lease:
    uid: str = "0b9c6a4e-4a3c-4d0e-9d51-0f3f1b6c2a11"
    pod_uid: str = "5d0c1f3e-2b7a-4c8e-a1d9-6e4f2c3b1a00"
    namespace: str = "build"
    binding: str = "runners"
    bot: str = "ci-bot"
    identity: str = "runner.build.serviceaccount.identity.linkerd.cluster.local"

    def digest(self) -> bytes:
        return phorge.lease_digest(
            lease_uid=self.uid,
            pod_uid=self.pod_uid,
            namespace=self.namespace,
            binding=self.binding,
            bot=self.bot,
            identity=self.identity,
        )


A = Lease()
B = Lease(uid="7e1f0a2b-9c8d-4e3f-8a7b-6c5d4e3f2a1b")


def _mint(
    lease: Lease = A,
    ring: credentials.KeyRing = RING,
    now: datetime.datetime = T0,
    not_after: datetime.datetime = LEASE_END,
    ttl: datetime.timedelta | None = None,
) -> str:
    return phorge.mint(
        ring, lease_uid=lease.uid, digest=lease.digest(), now=now, not_after=not_after, ttl=ttl
    )


def _index(*leases: Lease) -> Callable[[str], Iterable[tuple[Lease, bytes]]]:
    """What the gateway's lease watch does: every lease filed under its locator."""
    filed: dict[str, list[tuple[Lease, bytes]]] = {}
    for lease in leases:
        filed.setdefault(phorge.locator(lease.uid), []).append((lease, lease.digest()))
    return lambda loc: filed.get(loc, [])


def _verify(
    token: str,
    *leases: Lease,
    ring: credentials.KeyRing = RING,
    now: datetime.datetime = T0,
) -> phorge.Verified[Lease]:
    return phorge.verify(token, ring, _index(*(leases or (A,))), now=now, leeway=SKEW)


GOOD = _mint()


def test_round_trip() -> None:
    verified = _verify(GOOD, A, B)
    assert verified.holder == A
    assert verified.expires_at == LEASE_END
    assert verified.kid == RING.current.kid


def test_shape_fits_every_client_that_takes_a_phorge_token() -> None:
    assert PHORGE_SHAPE.match(GOOD)
    assert PHABFIVE_SHAPE.match(GOOD)
    assert re.fullmatch(r"api-[a-z2-7]{28}", GOOD)  # base32, as Phorge's own tokens
    assert GOOD.startswith("api-") and len(GOOD) == 32
    assert phorge.LOCATOR_CHARS + phorge.EXPIRY_CHARS + phorge.MAC_CHARS == 28
    assert phorge.MAC_BITS == 75
    # The log redaction knows the shape.
    assert GOOD not in logs.redact_text(f"refused {GOOD}!")


@given(
    uid=st.uuids().map(str),
    minutes=st.integers(min_value=1, max_value=24 * 60),
    seconds=st.integers(min_value=0, max_value=10**9),
)
def test_every_token_has_the_shape_and_verifies(uid: str, minutes: int, seconds: int) -> None:
    now = T0 + datetime.timedelta(seconds=seconds)
    lease = Lease(uid=uid)
    token = _mint(lease, now=now, not_after=now + datetime.timedelta(minutes=minutes))
    assert PHORGE_SHAPE.match(token) and PHABFIVE_SHAPE.match(token)
    assert _verify(token, lease, now=now).holder == lease


def test_the_construction_is_the_documented_one() -> None:
    """Recomputed from docs/security.md alone: HKDF, locator, expiry, truncated HMAC."""
    private = Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC_D))
    ring = credentials.KeyRing(SigningKey.from_private_key(private, T0))
    token = _mint(ring=ring)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"

    def b32(value: int, chars: int) -> str:
        return "".join(alphabet[(value >> 5 * (chars - 1 - i)) & 31] for i in range(chars))

    mac_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"phabmesh phorge-token v1"
    ).derive(b64url_decode(RFC_D))
    located = hashlib.sha256(b"phabmesh lease locator v1\x00" + A.uid.encode()).digest()
    facts = hashlib.sha256(b"phabmesh phorge-token v1\x00")
    for field in (A.uid, A.pod_uid, A.namespace, A.binding, A.bot, A.identity):
        facts.update(len(field.encode()).to_bytes(4, "big") + field.encode())
    expiry = int(LEASE_END.timestamp())
    mac = hmac.digest(
        mac_key,
        b"phabmesh phorge-token v1\x00" + facts.digest() + expiry.to_bytes(8, "big"),
        "sha256",
    )
    expected = (
        "api-"
        + b32(int.from_bytes(located[:4], "big") >> 2, 6)
        + b32(expiry, 7)
        + base64.b32encode(mac[:10]).decode().lower()[:15]
    )
    assert token == expected


def test_every_changed_character_is_refused() -> None:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    tried = 0
    for position in range(len(GOOD)):
        for char in alphabet + "A-_":
            if char == GOOD[position]:
                continue
            changed = GOOD[:position] + char + GOOD[position + 1 :]
            with pytest.raises(credentials.CredentialError):
                _verify(changed, A, B)
            tried += 1
    assert tried > 32 * 36


@pytest.mark.parametrize(
    "token",
    [
        "",
        "api-",
        GOOD[:-1],
        GOOD + "a",
        GOOD.upper(),
        GOOD.replace("api-", "cli-"),
        GOOD[:4] + "0" * 28,  # digits outside base32
        GOOD[:4] + "1" * 28,
        GOOD[:-1] + "8",
        " " + GOOD[1:],
        GOOD[:-1] + "\u00e9",
    ],
)
def test_malformed_tokens_are_refused_as_such(token: str) -> None:
    with pytest.raises(credentials.Malformed):
        _verify(token)


def test_random_tokens_of_the_right_shape_are_refused() -> None:
    for seed in range(200):
        body = hashlib.sha256(str(seed).encode()).digest()
        token = "api-" + base64.b32encode(body).decode().lower()[:28]
        with pytest.raises(credentials.UnknownCredential):
            _verify(token, A, B)


def test_another_rings_key_is_refused() -> None:
    other = credentials.KeyRing.generate(T0)
    with pytest.raises(credentials.UnknownCredential):
        _verify(_mint(ring=other))


def test_expiry_with_the_clock_skew_leeway() -> None:
    assert _verify(GOOD, now=LEASE_END).holder == A  # within the leeway
    assert _verify(GOOD, now=LEASE_END + SKEW - datetime.timedelta(seconds=1)).holder == A
    with pytest.raises(credentials.Expired):
        _verify(GOOD, now=LEASE_END + SKEW)
    with pytest.raises(credentials.Expired):
        _mint(now=LEASE_END)  # the lease has ended: nothing is minted


def test_expiry_is_capped_by_the_ttl_and_never_past_the_lease() -> None:
    short = _mint(ttl=datetime.timedelta(minutes=5))
    assert _verify(short).expires_at == T0 + datetime.timedelta(minutes=5)
    long = _mint(ttl=datetime.timedelta(hours=5))
    assert _verify(long).expires_at == LEASE_END
    with pytest.raises(ValueError, match="timezone-aware"):
        _mint(now=T0.replace(tzinfo=None))


def test_a_token_of_lease_a_is_refused_when_only_lease_b_exists() -> None:
    with pytest.raises(credentials.UnknownCredential):
        phorge.verify(GOOD, RING, _index(B), now=T0, leeway=SKEW)
    # Even if B were filed under A's locator (a 30-bit collision), A's MAC is not B's.
    filed = [(B, B.digest())]
    with pytest.raises(credentials.UnknownCredential):
        phorge.verify(GOOD, RING, lambda _: filed, now=T0, leeway=SKEW)
    # With both filed there, A is found, whatever the order.
    both = [(B, B.digest()), (A, A.digest())]
    assert phorge.verify(GOOD, RING, lambda _: both, now=T0, leeway=SKEW).holder == A


@pytest.mark.parametrize(
    "changed",
    [
        {"pod_uid": "another-pod"},
        {"namespace": "other"},
        {"binding": "other"},
        {"bot": "other-bot"},
        {"identity": "intruder.build.serviceaccount.identity.linkerd.cluster.local"},
    ],
)
def test_a_lease_with_other_facts_under_the_same_uid_is_refused(changed: dict[str, str]) -> None:
    impostor = dataclasses.replace(A, **changed)
    assert phorge.locator(impostor.uid) == phorge.locator(A.uid)
    with pytest.raises(credentials.UnknownCredential):
        _verify(GOOD, impostor)


def test_digest_fields_cannot_be_shifted_into_each_other() -> None:
    assert (
        Lease(namespace="ab", binding="c").digest() != Lease(namespace="a", binding="bc").digest()
    )


def test_key_rotation_retired_keys_verify_until_dropped() -> None:
    day = datetime.timedelta(days=1)
    rotated = credentials.rotate(RING, T0 + day, rotate_every=day, max_credential_ttl=day)
    assert rotated.current.kid != RING.current.kid
    # A token of the retired key still verifies, and says which key.
    assert _verify(GOOD, ring=rotated, now=T0).kid == RING.current.kid
    # New tokens use the new key.
    fresh = _mint(ring=rotated, now=T0 + day, not_after=LEASE_END + day)
    assert _verify(fresh, ring=rotated, now=T0 + day).kid == rotated.current.kid
    # Once the retired key is dropped, its tokens are refused.
    dropped = credentials.rotate(
        rotated, T0 + 3 * day, rotate_every=10 * day, max_credential_ttl=day
    )
    assert dropped.find(RING.current.kid) is None
    with pytest.raises(credentials.UnknownCredential):
        _verify(GOOD, ring=dropped, now=T0)


def test_mac_keys_survive_the_secret_round_trip_and_differ_per_key() -> None:
    """The issuer and the gateway read the ring from the Secret: both derive the same keys."""
    read_back = credentials.KeyRing.from_secret_data(RING.to_secret_data())
    assert _verify(GOOD, ring=read_back).holder == A
    other = SigningKey.generate(T0)
    assert other.phorge_mac_key != RING.current.phorge_mac_key
    assert len(RING.current.phorge_mac_key) == 32
    assert "phorge_mac_key" not in repr(RING.current)


def test_renewal_extends_only_tokens_minted_after_it() -> None:
    renewed_end = LEASE_END + datetime.timedelta(minutes=15)
    later = T0 + datetime.timedelta(minutes=10)
    after = _mint(now=later, not_after=renewed_end)
    assert after != GOOD
    assert _verify(after, now=later).expires_at == renewed_end
    assert _verify(GOOD, now=later).expires_at == LEASE_END  # unchanged by the renewal
    with pytest.raises(credentials.Expired):
        _verify(GOOD, now=LEASE_END + SKEW)
    assert _verify(after, now=LEASE_END + SKEW).holder == A


def test_distinct_leases_get_distinct_locators_and_tokens() -> None:
    leases = [Lease(uid=f"uid-{i}") for i in range(2000)]
    tokens = {_mint(lease) for lease in leases}
    assert len(tokens) == len(leases)
    locators = {phorge.locator(lease.uid) for lease in leases}
    assert len(locators) >= len(leases) - 2  # 30 bits: a collision among 2,000 is rare
    assert all(len(loc) == phorge.LOCATOR_CHARS for loc in locators)
