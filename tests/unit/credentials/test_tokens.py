"""Credentials: minting, strict verification, every way a token can be wrong, JWKS."""

from __future__ import annotations

import datetime
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from phabmesh import credentials
from phabmesh.credentials.keys import SigningKey, b64url, b64url_decode

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
ISS, AUD = "https://issuer.test", "phabmesh-gateway"
LEASE_END = T0 + datetime.timedelta(minutes=15)
SKEW = datetime.timedelta(seconds=30)
RFC_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
SUBJECT = "ci.build.serviceaccount.identity.linkerd.cluster.local"

RING = credentials.KeyRing.generate(T0)


def _mint(ring: credentials.KeyRing = RING, **over: object) -> str:
    args: dict[str, object] = {
        "issuer": ISS,
        "audience": AUD,
        "subject": SUBJECT,
        "now": T0,
        "not_after": LEASE_END,
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
    token: str, ring: credentials.KeyRing = RING, now: datetime.datetime = T0
) -> credentials.Claims:
    return credentials.verify(token, ring, audience=AUD, issuer=ISS, now=now, leeway=SKEW)


GOOD = _mint()


def _segments(token: str) -> tuple[dict[str, object], dict[str, object], str]:
    head, body, sig = token.split(".")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(body)), sig


def _encode(header: object, payload: object, sig: str) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}.{sig}"


def _resign(header: dict[str, object], payload: dict[str, object]) -> str:
    """A token signed properly by RING's key, with whatever header and payload."""
    raw_head = b64url(json.dumps(header).encode())
    raw_body = b64url(json.dumps(payload).encode())
    signature = RING.current.private_key.sign(f"{raw_head}.{raw_body}".encode())
    return f"{raw_head}.{raw_body}.{b64url(signature)}"


def _signed_raw(head: str, raw_payload: bytes) -> str:
    signing_input = f"{head}.{b64url(raw_payload)}"
    return f"{signing_input}.{b64url(RING.current.private_key.sign(signing_input.encode()))}"


def test_minted_credential_verifies_with_every_claim() -> None:
    claims = _verify(GOOD)
    assert claims == credentials.Claims(
        subject=SUBJECT,
        issuer=ISS,
        audience=AUD,
        issued_at=T0,
        not_before=T0,
        expires_at=LEASE_END,
        jti=claims.jti,
        pod="p",
        pod_uid="u1",
        namespace="build",
        binding="b",
        bot="ci-bot",
        bot_phid="PHID-USER-x",
        lease_uid="l1",
        kid=RING.current.kid,
    )
    header, payload, _ = _segments(GOOD)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": RING.current.kid}
    assert set(payload) == set(credentials.tokens.CLAIMS)
    assert len({_verify(_mint()).jti for _ in range(20)}) == 20  # unique jti


def test_pyjwt_reads_our_credentials_and_we_read_pyjwts() -> None:
    decoded = jwt.decode(
        GOOD,
        RING.current.public_key,
        algorithms=["EdDSA"],
        audience=AUD,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded["sub"] == SUBJECT
    _, payload, _ = _segments(GOOD)
    theirs = jwt.encode(
        payload, RING.current.private_key, algorithm="EdDSA", headers={"kid": RING.current.kid}
    )
    assert _verify(theirs).pod_uid == "u1"


def test_exp_never_passes_the_lease() -> None:
    capped = _verify(_mint(ttl=datetime.timedelta(hours=1)))
    assert capped.expires_at == LEASE_END
    short = _verify(_mint(ttl=datetime.timedelta(minutes=5)))
    assert short.expires_at == T0 + datetime.timedelta(minutes=5)
    odd = _verify(_mint(not_after=LEASE_END + datetime.timedelta(milliseconds=999)))
    assert odd.expires_at == LEASE_END  # rounded down, never up
    with pytest.raises(credentials.Expired):
        _mint(not_after=T0)
    with pytest.raises(credentials.Expired):
        _mint(not_after=T0 + datetime.timedelta(milliseconds=500))
    with pytest.raises(ValueError, match="timezone-aware"):
        _mint(now=datetime.datetime(2026, 1, 1))


def test_clock_skew_is_tolerated_up_to_the_leeway() -> None:
    _verify(GOOD, now=LEASE_END + datetime.timedelta(seconds=29))
    _verify(GOOD, now=T0 - datetime.timedelta(seconds=30))
    with pytest.raises(credentials.Expired):
        _verify(GOOD, now=LEASE_END + SKEW)
    with pytest.raises(credentials.NotYetValid):
        _verify(GOOD, now=T0 - datetime.timedelta(seconds=31))
    with pytest.raises(credentials.Expired):
        credentials.verify(
            GOOD, RING, audience=AUD, issuer=ISS, now=LEASE_END, leeway=datetime.timedelta(0)
        )


def _case(case: str) -> tuple[str, datetime.datetime]:
    header, payload, sig = _segments(GOOD)
    kid = RING.current.kid
    head, body, _ = GOOD.split(".")
    cases: dict[str, str] = {
        "alg-none": _encode({"alg": "none", "kid": kid}, payload, ""),
        "alg-none-signed": _encode({"alg": "none", "kid": kid}, payload, sig),
        "alg-lowercase": _resign({"alg": "eddsa", "kid": kid, "typ": "JWT"}, payload),
        "alg-missing": _resign({"kid": kid, "typ": "JWT"}, payload),
        "hs256-with-public-key": jwt.encode(
            payload, b"x" * 32, algorithm="HS256", headers={"kid": kid}
        ),
        "hs256-with-jwk-x": _encode({"alg": "HS256", "kid": kid}, payload, sig),
        "es256": _encode({"alg": "ES256", "kid": kid}, payload, sig),
        "unknown-kid": _mint(credentials.KeyRing(SigningKey.generate(T0))),
        "no-kid": _resign({"alg": "EdDSA", "typ": "JWT"}, payload),
        "numeric-kid": _resign({"alg": "EdDSA", "kid": 1}, payload),
        "another-key-same-kid": jwt.encode(
            payload,
            Ed25519PrivateKey.generate(),
            algorithm="EdDSA",
            headers={"kid": kid, "typ": "JWT"},
        ),
        "embedded-jwk": _resign({"alg": "EdDSA", "kid": kid, "jwk": {"x": RFC_X}}, payload),
        "crit": _resign({"alg": "EdDSA", "kid": kid, "crit": ["b64"], "b64": False}, payload),
        "typ-other": _resign({"alg": "EdDSA", "kid": kid, "typ": "at+jwt"}, payload),
        "header-not-object": _encode(["EdDSA"], payload, sig),
        "duplicate-header-key": (
            b64url(b'{"alg":"EdDSA","kid":"x","kid":"' + kid.encode() + b'"}') + f".{body}.{sig}"
        ),
        "expired": GOOD,
        "not-yet-valid": GOOD,
        "wrong-audience": _mint(audience="someone-else"),
        "audience-list": _resign(header, dict(payload, aud=[AUD])),
        "wrong-issuer": _mint(issuer="https://evil.test"),
        "truncated": GOOD[:-10],
        "truncated-segment": f"{head}.{body}",
        "padded": GOOD + "==",
        "padded-middle": f"{head}=.{body}.{sig}",
        "whitespace": GOOD + "\n",
        "four-segments": GOOD + ".x",
        "tampered-claims": _encode(header, dict(payload, pod_uid="o"), sig),
        "tampered-header": _encode({"typ": "JWT", "kid": kid, "alg": "EdDSA"}, payload, sig),
        "missing-claim": _resign(header, {k: v for k, v in payload.items() if k != "lease_uid"}),
        "claim-wrong-type": _resign(header, dict(payload, pod_uid=7)),
        "exp-as-string": _resign(header, dict(payload, exp=str(payload["exp"]))),
        "exp-as-bool": _resign(header, dict(payload, exp=True)),
        "exp-huge": _resign(header, dict(payload, exp=10**30)),
        "payload-not-object": _resign(header, [payload]),  # type: ignore[arg-type]
        "duplicate-claim": _signed_raw(head, b'{"pod_uid":"other",' + b64url_decode(body)[1:]),
        "garbage": "not.a.jwt",
        "empty": "",
        "huge": GOOD + "A" * 9000,
        "short-signature": f"{head}.{body}.{sig[:-4]}",
    }
    now = T0
    if case == "expired":
        now = LEASE_END + datetime.timedelta(minutes=1)
    elif case == "not-yet-valid":
        now = T0 - datetime.timedelta(minutes=1)
    return cases[case], now


BAD = {
    "alg-none": credentials.UnsupportedAlgorithm,
    "alg-none-signed": credentials.UnsupportedAlgorithm,
    "alg-lowercase": credentials.UnsupportedAlgorithm,
    "alg-missing": credentials.UnsupportedAlgorithm,
    "hs256-with-public-key": credentials.UnsupportedAlgorithm,
    "hs256-with-jwk-x": credentials.UnsupportedAlgorithm,
    "es256": credentials.UnsupportedAlgorithm,
    "unknown-kid": credentials.UnknownKey,
    "no-kid": credentials.UnknownKey,
    "numeric-kid": credentials.UnknownKey,
    "another-key-same-kid": credentials.BadSignature,
    "embedded-jwk": credentials.Malformed,
    "crit": credentials.Malformed,
    "typ-other": credentials.Malformed,
    "header-not-object": credentials.Malformed,
    "duplicate-header-key": credentials.Malformed,
    "expired": credentials.Expired,
    "not-yet-valid": credentials.NotYetValid,
    "wrong-audience": credentials.WrongAudience,
    "audience-list": credentials.Malformed,  # phabmesh writes one audience, a string
    "wrong-issuer": credentials.WrongIssuer,
    "truncated": credentials.Malformed,
    "truncated-segment": credentials.Malformed,
    "padded": credentials.Malformed,
    "padded-middle": credentials.Malformed,
    "whitespace": credentials.Malformed,
    "four-segments": credentials.Malformed,
    "tampered-claims": credentials.BadSignature,
    "tampered-header": credentials.BadSignature,
    "missing-claim": credentials.Malformed,
    "claim-wrong-type": credentials.Malformed,
    "exp-as-string": credentials.Malformed,
    "exp-as-bool": credentials.Malformed,
    "exp-huge": credentials.Malformed,
    "payload-not-object": credentials.Malformed,
    "duplicate-claim": credentials.Malformed,
    "garbage": credentials.Malformed,
    "empty": credentials.Malformed,
    "huge": credentials.Malformed,
    "short-signature": credentials.Malformed,
}


@pytest.mark.parametrize(("case", "error"), BAD.items())
def test_every_bad_credential_is_refused(case: str, error: type[Exception]) -> None:
    token, now = _case(case)
    with pytest.raises(error) as refused:
        _verify(token, now=now)
    message = str(refused.value)
    assert message
    assert GOOD not in message
    assert not token or token[:20] not in message  # nothing of the token is quoted
    assert "u1" not in message and "PHID" not in message
    assert isinstance(refused.value, credentials.CredentialError)


@settings(max_examples=150)
@given(st.data())
def test_changing_any_character_breaks_it(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(GOOD) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_x.0=+/ "))
    if GOOD[index] == replacement:
        return
    forged = GOOD[:index] + replacement + GOOD[index + 1 :]
    with pytest.raises(credentials.CredentialError):
        _verify(forged)


@settings(max_examples=100)
@given(st.data())
def test_flipping_any_bit_of_any_decoded_segment_breaks_it(data: st.DataObject) -> None:
    parts = [b64url_decode(p) for p in GOOD.split(".")]
    which = data.draw(st.integers(0, 2))
    byte = data.draw(st.integers(0, len(parts[which]) - 1))
    bit = data.draw(st.integers(0, 7))
    changed = bytearray(parts[which])
    changed[byte] ^= 1 << bit
    parts[which] = bytes(changed)
    with pytest.raises(credentials.CredentialError):
        _verify(".".join(b64url(p) for p in parts))


def test_it_verifies_against_the_published_jwks() -> None:
    rotated = credentials.rotate(
        RING,
        T0 + datetime.timedelta(days=1),
        datetime.timedelta(days=1),
        datetime.timedelta(hours=1),
    )
    document = credentials.jwks(rotated)
    assert [k["kid"] for k in document["keys"]] == [rotated.current.kid, RING.current.kid]
    for jwk in document["keys"]:
        assert jwk.keys() == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == (
            "OKP",
            "Ed25519",
            "sig",
            "EdDSA",
        )
    claims = credentials.verify_with_jwks(GOOD, document, audience=AUD, issuer=ISS, now=T0)
    assert claims.bot == "ci-bot"
    # Through JSON, as a validator elsewhere would fetch it.
    fetched = json.loads(json.dumps(document))
    assert credentials.verify_with_jwks(GOOD, fetched, audience=AUD, issuer=ISS, now=T0) == claims
    with pytest.raises(credentials.Expired):
        credentials.verify_with_jwks(
            GOOD, document, audience=AUD, issuer=ISS, now=LEASE_END + datetime.timedelta(hours=1)
        )


@pytest.mark.parametrize(
    "change",
    [
        {"kty": "EC"},
        {"crv": "Ed448"},
        {"alg": "HS256"},
        {"use": "enc"},
        {"x": "AAAA"},
        {"x": RFC_X + "="},
        {"kid": "other"},
    ],
)
def test_a_jwks_entry_that_is_not_our_key_kind_is_not_used(change: dict[str, str]) -> None:
    jwk = dict(RING.current.jwk(), **change)
    with pytest.raises(credentials.UnknownKey):
        credentials.verify_with_jwks(GOOD, {"keys": [jwk]}, audience=AUD, issuer=ISS, now=T0)
    with pytest.raises(credentials.UnknownKey):
        credentials.verify_with_jwks(GOOD, {"keys": "nope"}, audience=AUD, issuer=ISS, now=T0)


def test_discovery_document() -> None:
    doc = credentials.discovery_document(ISS, f"{ISS}/.well-known/jwks.json")
    assert doc["issuer"] == ISS
    assert doc["jwks_uri"] == f"{ISS}/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["EdDSA"]
    assert doc["subject_types_supported"] == ["public"]
    assert {"sub", "aud", "exp", "pod_uid", "lease_uid", "bot_phid"} <= set(doc["claims_supported"])
    json.dumps(doc)


def test_unverified_claims_for_display() -> None:
    assert credentials.unverified_claims(GOOD)["pod_uid"] == "u1"
    with pytest.raises(credentials.Malformed):
        credentials.unverified_claims("nope")


def test_the_verified_cache_serves_only_the_same_text_and_still_checks_time() -> None:
    ring = RING
    token = _mint(ring)
    cache = credentials.VerifiedCache(size=2)
    first = cache.verify(token, ring, audience=AUD, issuer=ISS, now=T0)
    assert cache.verify(token, ring, audience=AUD, issuer=ISS, now=T0) == first
    assert len(cache) == 1
    # Time is checked on every use, cached or not.
    with pytest.raises(credentials.Expired):
        cache.verify(token, ring, audience=AUD, issuer=ISS, now=T0 + datetime.timedelta(days=1))
    # Another audience or issuer is verified in full (and refused).
    with pytest.raises(credentials.WrongAudience):
        cache.verify(token, ring, audience="other", issuer=ISS, now=T0)
    # One changed character is another text: verified in full, refused.
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(credentials.CredentialError):
        cache.verify(tampered, ring, audience=AUD, issuer=ISS, now=T0)
    # A new key ring empties it; the size bound holds.
    other = credentials.KeyRing.generate(T0)
    with pytest.raises(credentials.UnknownKey):
        cache.verify(token, other, audience=AUD, issuer=ISS, now=T0)
    assert len(cache) == 0
    for _ in range(3):
        cache.verify(_mint(other), other, audience=AUD, issuer=ISS, now=T0)
    assert len(cache) == 2
