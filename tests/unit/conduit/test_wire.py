"""Request decoding follows Phorge: where each encoding's token and params are read from."""

from __future__ import annotations

import gzip
from typing import Any
from urllib.parse import urlencode

import pytest

from phabmesh.conduit import wire

FORM = "application/x-www-form-urlencoded"
TOKEN = "api-" + "t" * 28


def decode(pairs: list[tuple[str, str]], query: str = "", content_type: str = FORM) -> wire.Call:
    return wire.decode_request("POST", content_type, urlencode(pairs).encode(), query)


@pytest.mark.parametrize("encoding", ["form", "params-json", "per-key-json"])
def test_every_encoding_round_trips(encoding: Any) -> None:
    params = {"constraints": {"usernames": ["a", "b"]}, "queryKey": "all"}
    call = decode(wire.encode(params, TOKEN, encoding))
    assert (call.params, call.token, call.encoding) == (params, TOKEN, encoding)
    assert call.strict is (encoding != "form")
    again = wire.decode_request("POST", FORM, call.encode()[0])
    assert again == call


def test_form_values_stay_strings() -> None:
    call = decode(wire.encode_form({"constraints": {"isBot": True}, "limit": 2}, TOKEN))
    assert call.params == {"constraints": {"isBot": "true"}, "limit": "2"}


def test_per_key_token_lives_in_params_conduit() -> None:
    pairs = wire.encode_per_key_json({"limit": 5}, TOKEN)
    assert ("params[__conduit__]", f'{{"token": "{TOKEN}"}}') in pairs
    assert all(name != "api.token" for name, _ in pairs)


@pytest.mark.parametrize(
    "pairs",
    [
        [("params", "{}"), ("api.token", TOKEN)],
        [("params[limit]", "5"), ("api.token", TOKEN)],
    ],
)
def test_json_encodings_ignore_a_token_beside_them(pairs: list[tuple[str, str]]) -> None:
    # Phorge reads metadata only from __conduit__ inside the JSON params.
    assert decode(pairs).token is None


def test_form_metadata_and_magic_fields_are_not_params() -> None:
    call = decode(
        [
            ("api.token", TOKEN),
            ("api.other", "x"),
            ("output", "json"),
            ("__conduit__", "1"),
            ("__ajax__", "1"),
            ("scope", "s"),
            ("limit", "1"),
        ]
    )
    assert call.params == {"limit": "1"}
    assert call.token == TOKEN and call.output == "json"


def test_empty_token_is_no_token() -> None:
    assert decode([("api.token", "")]).token is None
    assert decode([("params", '{"__conduit__": {"token": ""}}')]).token is None


def test_the_body_wins_over_the_query_string_key_by_key() -> None:
    call = decode([("limit", "2")], query="limit=9&queryKey=all&constraints[a]=1")
    assert call.params == {"limit": "2", "queryKey": "all", "constraints": {"a": "1"}}


def test_only_exactly_application_json_is_refused() -> None:
    with pytest.raises(wire.BadRequest, match="form-encoded"):
        wire.decode_request("POST", "application/json", b"{}")
    # Phorge compares the whole header: with a charset the body is read as a form.
    call = wire.decode_request("POST", "application/json; charset=utf-8", b"{}")
    assert call.params == {"{}": ""}


def test_bad_json_params_are_refused_as_phorge_words_it() -> None:
    with pytest.raises(wire.InvalidParams) as bad:
        decode([("params", "{nope")])
    assert bad.value.info("user.whoami") == (
        "Invalid parameter information was passed to method 'user.whoami'."
    )
    with pytest.raises(wire.InvalidParamValue, match="The value for parameter 'limit' is not"):
        decode([("params[limit]", "five")])


def test_params_nested_past_the_parsers_depth_are_invalid_not_a_crash() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(wire.InvalidParams):
        decode([("params", deep)])
    with pytest.raises(wire.InvalidParamValue):
        decode([("params[constraints]", deep)])


def test_an_empty_per_key_box_is_null() -> None:
    assert decode([("params[after]", "")]).params == {"after": None}


def test_gzip_bodies_are_read() -> None:
    body = urlencode(wire.encode_params_json({}, TOKEN)).encode()
    call = wire.decode_request("POST", FORM, gzip.compress(body), content_encoding="gzip")
    assert call.token == TOKEN


@pytest.mark.parametrize(
    ("pairs", "params"),
    [
        (
            [("constraints[usernames][0]", "a"), ("constraints[usernames][1]", "b")],
            {"constraints": {"usernames": ["a", "b"]}},
        ),
        ([("a[]", "x"), ("a[]", "y")], {"a": ["x", "y"]}),
        ([("m[k]", "v")], {"m": {"k": "v"}}),
    ],
)
def test_php_style_form_fields(pairs: list[tuple[str, str]], params: dict[str, Any]) -> None:
    assert wire.parse_form(pairs) == params


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"a" * (4 << 20))
    with pytest.raises(wire.RequestTooLarge):
        wire.decode_request("POST", FORM, bomb, content_encoding="gzip", max_bytes=1 << 20)
    with pytest.raises(wire.BadRequest):
        wire.decode_request("POST", FORM, b"not gzip", content_encoding="gzip")


# The attack value of a review: a private-key header repeated 12,000 times (324 KB).
PEM_FLOOD = "-----BEGIN PRIVATE KEY-----" * 12_000


def test_a_refused_value_is_echoed_only_in_part() -> None:
    with pytest.raises(wire.InvalidParamValue) as refused:
        decode([("params[x]", PEM_FLOOD)])
    info = refused.value.info("user.whoami")
    assert info.startswith("The value for parameter 'x' is not valid JSON.")
    assert len(info) < 2 * wire.ECHO_CHARS + 400
    assert info.endswith("more characters].")
    with pytest.raises(wire.InvalidParamValue) as long_key:
        decode([(f"params[{'k' * 100_000}]", "not json")])
    assert len(long_key.value.info("user.whoami")) < 2 * wire.ECHO_CHARS + 400


@pytest.mark.parametrize("depth", [65, 3_000, 300_000])
def test_names_nested_past_the_limit_are_refused_not_a_crash(depth: int) -> None:
    key = "a" + "[x]" * depth
    body = f"{key}=1".encode()
    with pytest.raises(wire.NestedTooDeep) as refused:
        wire.decode_request("POST", FORM, body, max_bytes=1 << 20)
    assert isinstance(refused.value, wire.BadRequest)  # the gateway answers ERR-CONDUIT-CORE
    assert len(str(refused.value)) < wire.ECHO_CHARS + 200
    with pytest.raises(wire.NestedTooDeep):
        wire.decode_request("POST", FORM, b"", query_string=f"{key}=1")


def test_names_nested_up_to_the_limit_are_forwarded_as_sent() -> None:
    key = "a" + "[x]" * wire.MAX_NESTING
    call = decode([(key, "1"), ("b[]", "x"), ("b[]", "y")])
    assert call.encoding == "form"
    assert wire.flatten(call.params) == [(key, "1"), ("b[0]", "x"), ("b[1]", "y")]


def test_flattening_is_not_recursive() -> None:
    deep: dict[str, object] = {"leaf": [True, None, 7]}
    for _ in range(20_000):  # far past Python's recursion limit
        deep = {"x": deep}
    pairs = wire.flatten({"a": deep})
    prefix = "a" + "[x]" * 20_000
    assert pairs == [
        (f"{prefix}[leaf][0]", "true"),
        (f"{prefix}[leaf][1]", ""),
        (f"{prefix}[leaf][2]", "7"),
    ]
    assert wire.flatten({"a": {"b": [1, {"c": "d"}]}, "e": "f"}, "p") == [
        ("p[a][b][0]", "1"),
        ("p[a][b][1][c]", "d"),
        ("p[e]", "f"),
    ]


def test_field_count_is_bounded_before_parsing() -> None:
    fields = "&".join(["k=v"] * wire.MAX_FIELDS)
    assert len(wire.decode_request("POST", FORM, fields.encode()).params) == 1
    with pytest.raises(wire.RequestTooLarge):
        wire.decode_request("POST", FORM, (fields + "&z=1").encode())
    with pytest.raises(wire.RequestTooLarge):
        wire.decode_request("POST", FORM, fields.encode(), query_string="z=1")


def test_refusals_survive_the_trip_to_and_from_a_worker_process() -> None:
    import pickle

    for error in (
        wire.InvalidParamValue("k", "v" * 1000),
        wire.NestedTooDeep("a" + "[x]" * 100),
        wire.InvalidParams("invalid params"),
        wire.RequestTooLarge("too many form fields"),
    ):
        back = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(back) is type(error)
        assert str(back) == str(error)
        assert back.info("user.whoami") == error.info("user.whoami")


@pytest.mark.parametrize("encoding", ["form", "params-json", "per-key-json"])
def test_packed_params_encode_as_the_decoded_ones(encoding: Any) -> None:
    params = {"constraints": {"usernames": ["ci-bot", "x"]}, "limit": "5"}
    body = urlencode(wire.encode(params, TOKEN, encoding)).encode()
    plain = wire.decode_request("POST", FORM, body)
    packed = wire.decode_packed("POST", FORM, body)
    assert packed.params == {} and packed.packed is not None
    assert (packed.token, packed.encoding, packed.size) == (plain.token, plain.encoding, plain.size)
    assert packed.unpacked().params == plain.params
    assert (
        packed.with_token("api-" + "b" * 28).encode()
        == plain.with_token("api-" + "b" * 28).encode()
    )
