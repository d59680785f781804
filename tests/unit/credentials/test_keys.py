"""Signing keys: RFC 8037 vectors, the ring's Secret form, and the rotation policy."""

from __future__ import annotations

import base64
import datetime
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from phabmesh import credentials
from phabmesh.credentials.keys import SECRET_KEY, SigningKey, b64url, b64url_decode, public_x

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
DAY = 24 * HOUR

# RFC 8037, Appendix A.1-A.4
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC_KID = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def rfc_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC_D))


def test_rfc8037_key_thumbprint_and_signature() -> None:
    key = rfc_key()
    assert public_x(key.public_key()) == RFC_X
    assert credentials.thumbprint(RFC_X) == RFC_KID
    signing = SigningKey.from_private_key(key, T0)
    assert signing.kid == RFC_KID
    assert signing.jwk() == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": RFC_X,
        "kid": RFC_KID,
        "use": "sig",
        "alg": "EdDSA",
    }
    signing_input, _, signature = RFC_JWS.rpartition(".")
    assert b64url(key.sign(signing_input.encode())) == signature  # Ed25519 is deterministic
    # PyJWT, which mints phabmesh's credentials, agrees with the RFC.
    decoded = jwt.api_jws.decode_complete(RFC_JWS, key.public_key(), algorithms=["EdDSA"])
    assert decoded["payload"] == b"Example of Ed25519 signing"


@pytest.mark.parametrize("text", ["QQ==", "QQ", "QR", "Q", "Q Q", "QQ\n", "+/", "abc="])
def test_strict_base64url(text: str) -> None:
    if text == "QQ":
        assert b64url_decode(text) == b"A"
        return
    with pytest.raises(ValueError):
        b64url_decode(text)


@given(st.binary(max_size=80))
def test_base64url_round_trips(data: bytes) -> None:
    assert b64url_decode(b64url(data)) == data


def test_keys_never_show_their_private_half() -> None:
    ring = credentials.KeyRing.generate(T0)
    pem_marker = "PRIVATE KEY"
    assert pem_marker not in repr(ring)
    assert pem_marker not in str(ring.current)
    assert "private_key" not in repr(ring.current)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SigningKey.generate(datetime.datetime(2026, 1, 1))


def test_ring_survives_the_secret_round_trip() -> None:
    ring = credentials.rotate(credentials.KeyRing.generate(T0), T0 + 25 * HOUR, DAY, 48 * HOUR)
    data = ring.to_secret_data()
    assert list(data) == [SECRET_KEY]
    document = json.loads(base64.b64decode(data[SECRET_KEY]))
    assert all(e["privateKey"].startswith("-----BEGIN PRIVATE KEY-----") for e in document["keys"])
    again = credentials.KeyRing.from_secret_data(data)
    assert again == ring  # kids and times; private keys are not compared
    assert again.previous[0].retired_at == T0 + 25 * HOUR
    assert again.current.jwk() == ring.current.jwk()


def _data(document: object) -> dict[str, str]:
    return {SECRET_KEY: base64.b64encode(json.dumps(document).encode()).decode()}


def _entries() -> list[dict[str, object]]:
    data = credentials.KeyRing.generate(T0).to_secret_data()
    entries: list[dict[str, object]] = json.loads(base64.b64decode(data[SECRET_KEY]))["keys"]
    return entries


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "has no"),
        ({SECRET_KEY: "bm90IGpzb24="}, "unreadable"),
        ({SECRET_KEY: "%%%"}, "unreadable"),
        (_data({"keys": []}), "no keys"),
        (_data({}), "unreadable"),
        (_data({"keys": [dict(_entries()[0], kid="forged")]}), "does not match"),
        (_data({"keys": [dict(_entries()[0], privateKey="junk")]}), "unreadable"),
        (_data({"keys": [dict(_entries()[0], createdAt="2026-01-01T00:00:00")]}), "unreadable"),
        (_data({"keys": _entries() * 2}), "twice"),
    ],
)
def test_a_broken_secret_is_refused_without_quoting_it(data: dict[str, str], message: str) -> None:
    with pytest.raises(credentials.KeyRingError, match=message) as refused:
        credentials.KeyRing.from_secret_data(data)
    assert "PRIVATE" not in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_rotation_is_due_after_rotate_every() -> None:
    ring = credentials.KeyRing.generate(T0)
    assert credentials.rotate(ring, T0 + DAY - datetime.timedelta(seconds=1), DAY, HOUR) is ring
    rotated = credentials.rotate(ring, T0 + DAY, DAY, HOUR)
    assert rotated.current.kid != ring.current.kid
    assert rotated.current.created_at == T0 + DAY
    assert [(k.kid, k.retired_at) for k in rotated.previous] == [(ring.current.kid, T0 + DAY)]


def test_retired_keys_stay_until_their_credentials_expire_plus_skew() -> None:
    ring = credentials.rotate(credentials.KeyRing.generate(T0), T0 + DAY, DAY, HOUR)
    skew = datetime.timedelta(seconds=30)
    edge = T0 + DAY + HOUR + skew
    assert credentials.rotate(ring, edge, DAY, HOUR, skew) is ring  # not yet: == is kept
    later = credentials.rotate(ring, edge + datetime.timedelta(microseconds=1), DAY, HOUR, skew)
    assert later.previous == ()
    assert later.current == ring.current
    # Without skew the key goes as soon as its last credential has expired.
    assert (
        credentials.rotate(
            ring, T0 + DAY + HOUR + datetime.timedelta(seconds=1), DAY, HOUR
        ).previous
        == ()
    )


def test_rotation_keeps_several_generations_while_needed() -> None:
    ring = credentials.KeyRing.generate(T0)
    for day in range(1, 4):
        ring = credentials.rotate(ring, T0 + day * DAY, DAY, 36 * HOUR)
    assert (
        len(ring.previous) == 2
    )  # the key retired on day 1 expired its last credential on day 2.5


def test_a_previous_key_without_retirement_is_stamped_and_kept() -> None:
    old = SigningKey.generate(T0)
    ring = credentials.KeyRing(SigningKey.generate(T0), (old,))
    stamped = credentials.rotate(ring, T0 + HOUR, DAY, HOUR)
    assert stamped is not ring
    assert stamped.previous[0].retired_at == T0 + HOUR


@given(
    steps=st.lists(st.integers(min_value=1, max_value=3 * 24 * 60), min_size=1, max_size=20),
    ttl_minutes=st.integers(min_value=1, max_value=3 * 24 * 60),
)
def test_rotation_never_drops_a_key_a_live_credential_needs(
    steps: list[int], ttl_minutes: int
) -> None:
    ttl = datetime.timedelta(minutes=ttl_minutes)
    ring = credentials.KeyRing.generate(T0)
    now = T0
    signed: list[tuple[str, datetime.datetime]] = []  # (kid, credential expiry)
    for minutes in steps:
        signed.append((ring.current.kid, now + ttl))
        now += datetime.timedelta(minutes=minutes)
        ring = credentials.rotate(ring, now, DAY, ttl)
        kids = {k.kid for k in ring.keys}
        assert all(kid in kids for kid, expiry in signed if expiry >= now)
        assert len(ring.keys) == len(kids)
