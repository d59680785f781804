"""Herald webhook deliveries: the payload as Phorge builds it, its signature, freshness and
replays (pure)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from phabmesh import herald
from phabmesh.dev.conduit import hooks

# What a real Phorge sent (tests/conduit/herald/deliveries.json says how it was recorded).
RECORDED = json.loads(
    (Path(__file__).parents[1] / "conduit" / "herald" / "deliveries.json").read_text()
)

KEY = "0123456789abcdefghijklmnopqrstuv"  # Phorge makes 32 random characters
NOW = 1_800_000_000
WINDOW = 300.0


def _body(epoch: int = NOW, **kw: object) -> bytes:
    return herald.payload("PHID-DREV-abcdefghijklmnopqrst", epoch=epoch, **kw)  # type: ignore[arg-type]


def test_the_payload_is_formatted_as_phutil_json_formats_it() -> None:
    body = herald.payload(
        "PHID-TASK-aaaaaaaaaaaaaaaaaaaa",
        epoch=1700000000,
        triggers=["PHID-HRUL-bbbbbbbbbbbbbbbbbbbb"],
        transactions=["PHID-XACT-TASK-cccccccccccccc"],
        test=True,
    )
    # Two-space indentation, '": "' after keys, no escaped slashes, a final newline; in
    # Phorge's key order (object, triggers, action, transactions).
    assert body.decode() == (
        "{\n"
        '  "object": {\n'
        '    "type": "TASK",\n'
        '    "phid": "PHID-TASK-aaaaaaaaaaaaaaaaaaaa"\n'
        "  },\n"
        '  "triggers": [\n'
        "    {\n"
        '      "phid": "PHID-HRUL-bbbbbbbbbbbbbbbbbbbb"\n'
        "    }\n"
        "  ],\n"
        '  "action": {\n'
        '    "test": true,\n'
        '    "silent": false,\n'
        '    "secure": false,\n'
        '    "epoch": 1700000000\n'
        "  },\n"
        '  "transactions": [\n'
        "    {\n"
        '      "phid": "PHID-XACT-TASK-cccccccccccccc"\n'
        "    }\n"
        "  ]\n"
        "}\n"
    )
    # Empty lists are "[]", as PhutilJSON writes them.
    assert '"triggers": [],' in _body().decode()


def test_the_signature_is_the_hex_hmac_sha256_of_the_raw_body() -> None:
    body = _body()
    assert herald.sign(body, KEY) == hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()


def test_a_signed_fresh_delivery_is_read() -> None:
    body = _body(transactions=["PHID-XACT-DREV-x"])
    delivery = herald.verify(body, herald.sign(body, KEY), KEY, now=NOW + 10, freshness=WINDOW)
    assert delivery.object_phid == "PHID-DREV-abcdefghijklmnopqrst"
    assert delivery.object_type == "DREV"
    assert delivery.epoch == NOW
    assert not delivery.test
    assert delivery.digest == hashlib.sha256(body).hexdigest()
    # Upper-case hex and surrounding blanks are the same signature.
    upper = " " + herald.sign(body, KEY).upper() + " "
    assert herald.verify(body, upper, KEY, now=NOW, freshness=WINDOW) == delivery


@pytest.mark.parametrize(
    ("signature", "reason", "status"),
    [
        (None, herald.UNSIGNED, 401),
        ("", herald.UNSIGNED, 401),
        ("00" * 32, herald.BAD_SIGNATURE, 403),
        ("not hex at all", herald.BAD_SIGNATURE, 403),
        ("é" * 64, herald.BAD_SIGNATURE, 403),
    ],
)
def test_a_missing_or_wrong_signature_is_refused(
    signature: str | None, reason: str, status: int
) -> None:
    with pytest.raises(herald.Rejected) as refused:
        herald.verify(_body(), signature, KEY, now=NOW, freshness=WINDOW)
    assert (refused.value.reason, refused.value.status) == (reason, status)


def test_a_body_changed_after_signing_or_signed_with_another_key_is_refused() -> None:
    body = _body()
    signature = herald.sign(body, KEY)
    tampered = body.replace(b"DREV", b"TASK")
    for changed, key in ((tampered, KEY), (body, KEY + "x"), (body + b" ", KEY)):
        with pytest.raises(herald.Rejected) as refused:
            herald.verify(changed, signature, key, now=NOW, freshness=WINDOW)
        assert refused.value.reason == herald.BAD_SIGNATURE


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"object": {"phid": "PHID-X"}}',
        b'{"action": {"epoch": "1800000000"}}',
        b'{"action": {"epoch": true}}',
        b'{"action": {"epoch": 1.5e9}}',
        b'{"action": []}',
        b'{"action": {"epoch": -5}}',
        b'{"action": {"epoch": 1' + b"0" * 400 + b"}}",  # no float holds it
    ],
)
def test_a_signed_body_that_is_no_herald_payload_is_refused(body: bytes) -> None:
    with pytest.raises(herald.Rejected) as refused:
        herald.verify(body, herald.sign(body, KEY), KEY, now=NOW, freshness=WINDOW)
    assert (refused.value.reason, refused.value.status) == (herald.MALFORMED, 400)


@pytest.mark.parametrize("offset", [-301, 61, 299, -(10**9)])
def test_a_delivery_outside_the_freshness_window_is_stale(offset: int) -> None:
    """Older than the window, or further ahead of this clock than clocks differ (a body from
    the future would stay fresh, and held for the replay check, longer than the window)."""
    body = _body(epoch=NOW + offset)
    with pytest.raises(herald.Rejected) as refused:
        herald.verify(body, herald.sign(body, KEY), KEY, now=NOW, freshness=WINDOW)
    assert (refused.value.reason, refused.value.status) == (herald.STALE, 422)
    # At the window's edges it is fresh.
    for edge in (NOW - 300, NOW + 60):
        edged = _body(epoch=edge)
        herald.verify(edged, herald.sign(edged, KEY), KEY, now=NOW, freshness=WINDOW)


def _delivered(epoch: int = NOW, phid: str = "PHID-XACT-1") -> herald.Delivery:
    body = _body(epoch=epoch, transactions=[phid])
    return herald.verify(body, herald.sign(body, KEY), KEY, now=epoch, freshness=WINDOW)


def test_a_replay_within_the_window_is_refused_and_after_it_forgotten() -> None:
    cache = herald.ReplayCache(10)
    delivery = _delivered()
    cache.claim("ns", "hook", delivery, now=NOW, freshness=WINDOW)
    with pytest.raises(herald.Rejected) as refused:
        cache.claim("ns", "hook", delivery, now=NOW + 299, freshness=WINDOW)
    assert (refused.value.reason, refused.value.status) == (herald.REPLAYED, 409)
    # The same body to another webhook is that webhook's own first delivery.
    cache.claim("ns", "other", delivery, now=NOW, freshness=WINDOW)
    # Past the window the entry may go (the freshness check refuses that body anyway).
    cache.claim("ns", "hook", delivery, now=NOW + 301, freshness=WINDOW)


def test_a_delivery_not_delivered_is_released_for_phorges_retry() -> None:
    cache = herald.ReplayCache(10)
    delivery = _delivered()
    cache.claim("ns", "hook", delivery, now=NOW, freshness=WINDOW)
    cache.release("ns", "hook", delivery)
    cache.claim("ns", "hook", delivery, now=NOW + 1, freshness=WINDOW)
    assert len(cache) == 1


def test_one_namespace_filling_its_replay_entries_leaves_others_theirs() -> None:
    """A namespace that holds a webhook's key can sign as many fresh bodies as it likes: it
    fills its own entries, never another namespace's."""
    cache = herald.ReplayCache(2)
    for n in range(2):
        cache.claim("greedy", "hook", _delivered(phid=f"PHID-XACT-{n}"), now=NOW, freshness=WINDOW)
    with pytest.raises(herald.Full):
        cache.claim("greedy", "other", _delivered(phid="PHID-XACT-x"), now=NOW, freshness=WINDOW)
    cache.claim("quiet", "hook", _delivered(phid="PHID-XACT-0"), now=NOW, freshness=WINDOW)


def test_a_signature_header_that_is_no_text_is_refused_not_an_error() -> None:
    body = _body()
    for header in ("\udcff" * 64, "é" * 64, " "):
        with pytest.raises(herald.Rejected) as refused:
            herald.verify(body, header, KEY, now=NOW, freshness=WINDOW)
        assert refused.value.reason in (herald.BAD_SIGNATURE, herald.UNSIGNED)


def test_a_full_cache_drops_expired_entries_and_refuses_rather_than_forgets() -> None:
    cache = herald.ReplayCache(2)
    old = _delivered(epoch=NOW - 400, phid="PHID-XACT-old")
    cache.claim("ns", "hook", old, now=NOW - 400, freshness=WINDOW)
    cache.claim("ns", "hook", _delivered(phid="PHID-XACT-a"), now=NOW, freshness=WINDOW)
    # Full, but one entry has expired: it makes room.
    cache.claim("ns", "hook", _delivered(phid="PHID-XACT-b"), now=NOW, freshness=WINDOW)
    assert len(cache) == 2
    # Full of live entries: refused, and nothing forgotten.
    with pytest.raises(herald.Full):
        cache.claim("ns", "hook", _delivered(phid="PHID-XACT-c"), now=NOW, freshness=WINDOW)
    with pytest.raises(herald.Rejected):
        cache.claim("ns", "hook", _delivered(phid="PHID-XACT-a"), now=NOW, freshness=WINDOW)


def test_the_payload_round_trips_as_json() -> None:
    data = json.loads(_body(triggers=["PHID-HRUL-1"], silent=True, secure=True))
    assert data["action"] == {"test": False, "silent": True, "secure": True, "epoch": NOW}
    assert data["triggers"] == [{"phid": "PHID-HRUL-1"}]
    assert data["transactions"] == []


@pytest.mark.parametrize(
    "recorded", RECORDED["deliveries"], ids=lambda d: f"{d['what']}-{len(d['request']['body'])}"
)
def test_what_phorge_sent_is_rebuilt_byte_for_byte_and_verified(recorded: dict) -> None:
    """The test server's body and headers for the same delivery are Phorge's own, and the
    gateway's check accepts Phorge's signature (and refuses it on one changed byte)."""
    sent = recorded["request"]
    body = sent["body"].encode()
    data = json.loads(body)
    action = data["action"]
    hook = hooks.Hook(url="http://127.0.0.1/hooks/ns/name", key=RECORDED["key"])
    rebuilt, headers = hooks.request(
        hook,
        data["object"]["phid"],
        epoch=action["epoch"],
        transactions=tuple(t["phid"] for t in data["transactions"]),
        test=action["test"],
        triggers=tuple(t["phid"] for t in data["triggers"]),
    )
    assert rebuilt == body
    assert data["object"]["type"] == data["object"]["phid"].split("-")[1]
    for name, value in headers.items():
        assert sent["headers"][name] == value, name
    delivery = herald.verify(
        body, sent["headers"][herald.SIGNATURE_HEADER], RECORDED["key"], now=action["epoch"],
        freshness=WINDOW,
    )  # fmt: skip
    assert (delivery.object_phid, delivery.test) == (data["object"]["phid"], action["test"])
    with pytest.raises(herald.Rejected) as refused:
        herald.verify(
            body.replace(b'"secure": false', b'"secure": true '),
            sent["headers"][herald.SIGNATURE_HEADER], RECORDED["key"], now=action["epoch"],
            freshness=WINDOW,
        )  # fmt: skip
    assert refused.value.reason == herald.BAD_SIGNATURE


def test_the_recordings_cover_a_test_action_and_edits() -> None:
    kinds = [json.loads(d["request"]["body"])["action"]["test"] for d in RECORDED["deliveries"]]
    assert True in kinds and False in kinds
