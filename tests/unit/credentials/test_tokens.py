"""Credentials: RFC 8037 vectors, rotation, and every way a token can be wrong."""

from __future__ import annotations

import base64
import datetime
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from phabmesh import credentials
from phabmesh.credentials.keys import SigningKey, b64url, public_x

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
ISS, AUD = "https://issuer.test", "phabmesh-gateway"
HOUR = datetime.timedelta(hours=1)
SKEW = datetime.timedelta(seconds=30)

# RFC 8037, Appendix A.1-A.4
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC_KID = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_rfc8037_key_thumbprint_and_signature() -> None:
    key = Ed25519PrivateKey.from_private_bytes(_unb64(RFC_D))
    assert public_x(key.public_key()) == RFC_X
    assert credentials.thumbprint(RFC_X) == RFC_KID
    signing_input, _, signature = RFC_JWS.rpartition(".")
    assert b64url(key.sign(signing_input.encode())) == signature
    decoded = jwt.api_jws.decode_complete(RFC_JWS, key.public_key(), algorithms=["EdDSA"])
    assert decoded["payload"] == b"Example of Ed25519 signing"


def _ring() -> credentials.KeyRing:
    return credentials.KeyRing.generate(T0)


def _mint(ring: credentials.KeyRing, **over: object) -> str:
    args: dict[str, object] = {
        "issuer": ISS,
        "audience": AUD,
        "subject": "ci.build.serviceaccount.identity.linkerd.cluster.local",
        "now": T0,
        "not_after": T0 + datetime.timedelta(minutes=15),
        "pod": "p",
        "pod_uid": "u1",
        "namespace": "build",
        "binding": "b",
        "bot": "ci-bot",
        "bot_phid": "PHID-USER-x",
        "lease_uid": "l1",
    }
    args.update(over)
    return credentials.mint(ring, **args)  # type: ignore[arg-type]


def _verify(
    token: str, ring: credentials.KeyRing, now: datetime.datetime = T0
) -> credentials.Claims:
    return credentials.verify(token, ring, audience=AUD, issuer=ISS, now=now, leeway=SKEW)


def test_minted_credential_verifies_with_every_claim() -> None:
    ring = _ring()
    token = _mint(ring)
    claims = _verify(token, ring)
    assert claims.pod_uid == "u1"
    assert claims.lease_uid == "l1"
    assert claims.expires_at == T0 + datetime.timedelta(minutes=15)
    assert claims.kid == ring.current.kid
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": ring.current.kid}
    assert _mint(ring) != token  # unique jti


def test_it_verifies_against_the_published_jwks() -> None:
    ring = _ring()
    document = credentials.jwks(ring)
    assert document["keys"][0].keys() == {"kty", "crv", "x", "kid", "use", "alg"}
    assert all("d" not in jwk for jwk in document["keys"])  # no private part
    claims = credentials.verify_with_jwks(_mint(ring), document, audience=AUD, issuer=ISS, now=T0)
    assert claims.bot == "ci-bot"


def _forge(
    header: dict[str, object], payload: dict[str, object], key: object = None, alg: str = "none"
) -> str:
    if alg == "none":
        head = b64url(json.dumps(header).encode())
        body = b64url(json.dumps(payload).encode())
        return f"{head}.{body}."
    return jwt.encode(payload, key, algorithm=alg, headers=header)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("alg-none", credentials.UnsupportedAlgorithm),
        ("hs256-with-public-key", credentials.UnsupportedAlgorithm),
        ("unknown-kid", credentials.UnknownKey),
        ("another-key-same-kid", credentials.BadSignature),
        ("expired", credentials.Expired),
        ("not-yet-valid", credentials.NotYetValid),
        ("wrong-audience", credentials.WrongAudience),
        ("wrong-issuer", credentials.WrongIssuer),
        ("truncated", credentials.CredentialError),
        ("padded", credentials.CredentialError),
        ("tampered-claims", credentials.BadSignature),
        ("garbage", credentials.Malformed),
    ],
)
def test_every_bad_credential_is_refused(case: str, error: type[Exception]) -> None:
    ring = _ring()
    good = _mint(ring)
    payload = credentials.unverified_claims(good)
    kid = ring.current.kid
    now = T0
    if case == "alg-none":
        token = _forge({"alg": "none", "kid": kid}, payload)
    elif case == "hs256-with-public-key":
        token = _forge({"kid": kid}, payload, key=RFC_X.encode(), alg="HS256")
    elif case == "unknown-kid":
        token = _mint(credentials.KeyRing(SigningKey.generate(T0)))
    elif case == "another-key-same-kid":
        other = SigningKey.generate(T0)
        token = jwt.encode(
            payload, other.private_key, algorithm="EdDSA", headers={"kid": kid, "typ": "JWT"}
        )
    elif case == "expired":
        token, now = good, T0 + datetime.timedelta(minutes=16)
    elif case == "not-yet-valid":
        token, now = good, T0 - datetime.timedelta(minutes=1)
    elif case == "wrong-audience":
        token = _mint(ring, audience="someone-else")
    elif case == "wrong-issuer":
        token = _mint(ring, issuer="https://evil.test")
    elif case == "truncated":
        token = good[:-10]
    elif case == "padded":
        token = good + "=="
    elif case == "tampered-claims":
        head, _, sig = good.split(".")
        token = f"{head}.{b64url(json.dumps(dict(payload, pod_uid='other')).encode())}.{sig}"
    else:
        token = "not.a.jwt"
    with pytest.raises(error) as refused:
        _verify(token, ring, now)
    assert good not in str(refused.value)


def test_clock_skew_is_tolerated_up_to_the_leeway() -> None:
    ring = _ring()
    token = _mint(ring)
    _verify(token, ring, T0 + datetime.timedelta(minutes=15, seconds=29))
    _verify(token, ring, T0 - datetime.timedelta(seconds=29))
    with pytest.raises(credentials.Expired):
        _verify(token, ring, T0 + datetime.timedelta(minutes=15, seconds=31))


@settings(max_examples=60)
@given(st.data())
def test_changing_any_character_breaks_it(data: st.DataObject) -> None:
    ring = _ring()
    token = _mint(ring)
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_x.0"))
    if token[index] == replacement:
        return
    forged = token[:index] + replacement + token[index + 1 :]
    try:
        claims = _verify(forged, ring)
    except credentials.CredentialError:
        return
    # Base64url's last character can carry unused bits: the same bytes still verify.
    assert claims == _verify(token, ring)


def test_rotation_keeps_old_keys_until_their_credentials_expire() -> None:
    ring = _ring()
    old_token = _mint(ring, not_after=T0 + HOUR)
    assert credentials.rotate(ring, T0 + HOUR, 24 * HOUR, HOUR) is ring  # nothing due
    day = T0 + 24 * HOUR
    rotated = credentials.rotate(ring, day, 24 * HOUR, HOUR)
    assert rotated.current.kid != ring.current.kid
    assert [k.kid for k in rotated.previous] == [ring.current.kid]
    new_token = _mint(rotated, now=day, not_after=day + HOUR)
    _verify(new_token, rotated, day)
    with pytest.raises(credentials.Expired):
        _verify(old_token, rotated, day)  # expired by now, but its key is still known
    later = credentials.rotate(rotated, day + HOUR + datetime.timedelta(seconds=1), 24 * HOUR, HOUR)
    assert later.previous == ()
    assert [k["kid"] for k in credentials.jwks(later)["keys"]] == [rotated.current.kid]
    with pytest.raises(credentials.UnknownKey):
        _verify(old_token, later, day)


def test_ring_survives_the_secret_round_trip() -> None:
    ring = credentials.rotate(_ring(), T0 + 25 * HOUR, 24 * HOUR, 48 * HOUR)
    data = ring.to_secret_data()
    again = credentials.KeyRing.from_secret_data(data)
    assert [k.kid for k in again.keys] == [k.kid for k in ring.keys]
    assert again.previous[0].retired_at == ring.previous[0].retired_at
    token = _mint(ring)
    assert _verify(token, again).kid == ring.current.kid
    with pytest.raises(credentials.CredentialError):
        credentials.KeyRing.from_secret_data({"keys.json": "bm90IGpzb24="})
