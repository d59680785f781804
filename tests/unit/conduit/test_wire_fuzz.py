"""Hostile request bodies: the parser either decodes or refuses with BadRequest, bounded."""

from __future__ import annotations

import gzip

from hypothesis import given, settings
from hypothesis import strategies as st

from phabmesh.conduit import wire

CONTENT_TYPES = st.sampled_from(
    ["application/x-www-form-urlencoded", "application/json", "text/plain", "", "multipart/x"]
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=4096),
    content_type=CONTENT_TYPES,
    query=st.text(max_size=200),
    encoding=st.sampled_from(["", "gzip", "deflate", "br", "identity"]),
)
def test_any_bytes_decode_or_are_refused(
    body: bytes, content_type: str, query: str, encoding: str
) -> None:
    try:
        call = wire.decode_request(
            "POST", content_type, body, query, content_encoding=encoding, max_bytes=8192
        )
    except wire.BadRequest:
        return
    assert isinstance(call.params, dict)
    assert call.token is None or isinstance(call.token, str)
    call.encode()  # whatever was accepted can be forwarded


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.text(alphabet="ab[]0.", min_size=1, max_size=12), max_size=30),
    values=st.lists(st.text(max_size=20), max_size=30),
)
def test_php_style_keys_never_crash(keys: list[str], values: list[str]) -> None:
    form = wire.parse_form(list(zip(keys, values, strict=False)))
    assert isinstance(form, dict)


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"0" * (64 << 20))  # 64 MiB of zeros, about 64 KiB compressed
    try:
        wire.decode_request(
            "POST",
            "application/x-www-form-urlencoded",
            bomb,
            content_encoding="gzip",
            max_bytes=1 << 20,
        )
    except wire.RequestTooLarge:
        return
    raise AssertionError("the bomb was accepted")
