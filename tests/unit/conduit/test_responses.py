"""Answers are encoded as Phorge (PHP zlib.output_compression) encodes them; decoding is bounded."""

from __future__ import annotations

import asyncio
import base64
import gzip
import random
import zlib

import pytest

from phabmesh.conduit import responses

BODY = b'{"result":"vm","error_code":null,"error_info":null}'


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        # What PHP picks, checked against a stock Phorge.
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("gzip, deflate", "gzip"),
        ("deflate, gzip", "gzip"),  # gzip wins wherever it is
        ("x-gzip", "gzip"),
        ("identity", None),
        ("br", None),
        ("*", None),  # PHP looks for the names, not for a wildcard
        ("", None),
        (None, None),
        # Substring matching, case-sensitive, spacing irrelevant.
        ("  gzip  ", "gzip"),
        ("br,gzip;q=0.5", "gzip"),
        ("identity ,\tdeflate", "deflate"),
        ("GZIP", None),
        ("Gzip, Deflate", None),
        ("GZIP, deflate", "deflate"),
        # An explicit q=0 is a refusal (PHP would send the coding anyway).
        ("gzip;q=0", None),
        ("gzip; q=0.000, deflate", "deflate"),
        ("gzip;Q=0, deflate;q=0", None),
        ("gzip;q=0.001", "gzip"),
        ("gzip;q=0.5, deflate;q=1", "gzip"),  # otherwise q-values are ignored, as by PHP
        ("deflate;q=0, identity", None),
        ("gzip;q=0, x-gzip", "gzip"),
    ],
)
def test_negotiation_picks_what_php_picks(accept: str | None, coding: str | None) -> None:
    assert responses.negotiate(accept) == coding


def test_a_huge_header_is_read_only_so_far() -> None:
    far = "identity, " * 10_000 + "gzip"
    assert responses.negotiate(far) is None  # "gzip" is past the part read
    near = "gzip, " + "identity, " * 10_000
    assert responses.negotiate(near) == "gzip"
    assert responses.negotiate("a" * (1 << 20)) is None


def test_the_bytes_are_phps() -> None:
    """The recordings' compressed bytes, as a stock Phorge sent them."""
    gz = responses.encode(BODY, "gzip")
    assert gz.coding == "gzip"
    assert gz.body == base64.b64decode(
        "H4sIAAAAAAAAA6tWKkotLs0pUbJSKstV0lFKLSrKL4pPzk9JVbLKK83JgYlk5qXlQ0RqAXcxod8zAAAA"
    )
    assert gz.headers == {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    deflated = responses.encode(BODY, "deflate")
    assert deflated.body == base64.b64decode(  # zlib-wrapped (RFC 1950), not raw
        "eJyrVipKLS7NKVGyUirLVdJRSi0qyi+KT85PSVWyyivNyYGJZOal5UNEagHQ8BJg"
    )
    assert deflated.headers == {"Content-Encoding": "deflate", "Vary": "Accept-Encoding"}


def test_an_uncompressed_answer_has_no_encoding_headers() -> None:
    for accept in (None, "", "identity", "br", "gzip;q=0"):
        plain = responses.encode(BODY, accept)
        assert (plain.body, plain.coding, plain.headers) == (BODY, None, {})


@pytest.mark.parametrize(
    ("coding", "packed"),
    [
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),  # zlib-wrapped, as PHP sends it
        ("deflate", zlib.compress(BODY)[2:-4]),  # raw, as some servers do
        ("identity", BODY),
        ("", BODY),
        (None, BODY),
        ("identity, gzip", gzip.compress(BODY)),
    ],
)
def test_decoding_takes_every_coding_a_server_sends(coding: str | None, packed: bytes) -> None:
    assert responses.decode(packed, coding, 1 << 20) == BODY


def test_decoding_is_bounded() -> None:
    bomb = gzip.compress(b"x" * (8 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(responses.BodyTooLarge):
        responses.decode(bomb, "gzip", 1 << 20)
    with pytest.raises(responses.BodyTooLarge):
        responses.decode(b"x" * 101, None, 100)
    assert responses.decode(b"x" * 100, None, 100) == b"x" * 100
    assert responses.decode(gzip.compress(b"x" * 100), "gzip", 100) == b"x" * 100


@pytest.mark.parametrize(
    ("coding", "packed"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(BODY)[:-12]),  # cut short
        ("deflate", b"\xff\xff\xff"),
        ("br", BODY),
        ("gzip, gzip", gzip.compress(gzip.compress(BODY))),
    ],
)
def test_an_unreadable_body_is_refused(coding: str, packed: bytes) -> None:
    with pytest.raises(responses.UnreadableBody):
        responses.decode(packed, coding, 1 << 20)


def test_large_bodies_go_to_a_thread_and_come_back_the_same() -> None:
    big = b'{"result":"' + b"abc" * (responses.THREAD_ABOVE_BYTES // 2) + b'"}'
    encoded = asyncio.run(responses.encode_async(big, "gzip"))
    assert encoded == responses.encode(big, "gzip")
    assert responses.decode(encoded.body, "gzip", 1 << 24) == big
    small = asyncio.run(responses.encode_async(BODY, "deflate"))
    assert small == responses.encode(BODY, "deflate")


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("step", [1, 1000, 1 << 16])
def test_an_answer_inflates_in_steps_no_larger_than_asked(
    coding: responses.Coding, step: int
) -> None:
    body = bytes(random.Random(7).choices(b"abcdefgh", k=200_000))
    inflation = responses.Inflation(responses.compress(body, coding), coding, 1 << 20)
    made = []
    while not inflation.done:
        made.append(inflation.step(step))
    assert all(0 <= n <= step for n in made)
    assert sum(made) == len(body) and bytes(inflation.result) == body


def test_a_bomb_stops_at_its_bound_step_by_step_and_a_cut_body_is_unreadable() -> None:
    inflation = responses.Inflation(gzip.compress(b"x" * (8 << 20)), "gzip", 1 << 20)
    made = 0
    with pytest.raises(responses.BodyTooLarge):
        while True:
            made += inflation.step(1 << 16)
    assert made <= 1 << 20  # nothing past the bound was ever inflated
    cut = responses.Inflation(gzip.compress(BODY)[:-12], "gzip", 1 << 20)
    with pytest.raises(responses.UnreadableBody):
        while not cut.done:
            cut.step(10)
    plain = responses.Inflation(BODY, "identity", 1 << 20)
    assert plain.done and plain.result is BODY


def test_the_conduit_headers_are_phorges() -> None:
    assert responses.CONDUIT_HEADERS == {
        "Content-Type": "application/json",
        "X-Conduit-Capabilities": "gzip",
        "Cache-Control": "no-store",
        "Expires": "Sat, 01 Jan 2000 00:00:00 GMT",
    }


def test_the_envelope_is_written_as_php_writes_it() -> None:
    """Compact, slashes, non-ASCII, < and > escaped: as a stock Phorge answers."""
    assert responses.envelope(None, "ERR-CONDUIT-CALL", 'method "a/b" does not exist.') == (
        b'{"result":null,"error_code":"ERR-CONDUIT-CALL",'
        b'"error_info":"method \\"a\\/b\\" does not exist."}'
    )
    assert responses.php_json({"name": "Zoë <b>"}) == b'{"name":"Zo\\u00eb \\u003cb\\u003e"}'
