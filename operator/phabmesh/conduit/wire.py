"""Conduit's wire formats, both ways. Pure: no I/O.

Requests arrive (and are sent) in three encodings, all form-encoded:

1. flat form fields, PHP-style: ``api.token=...&constraints[usernames][0]=ci-bot``;
2. ``params=<json>&output=json&__conduit__=1`` with the token inside the JSON as
   ``__conduit__.token`` (arcanist; gzip-compressed once the server advertises it);
3. per-key JSON, ``params[constraints]=<json>`` (the web console).

A GET query string works like a form body. ``Content-Type: application/json``
is refused, as Phorge refuses it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import zlib
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

Encoding = Literal["form", "params-json", "per-key-json"]
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class BadRequest(ValueError):
    """The body cannot be read as a Conduit call (Phorge answers ERR-CONDUIT-CORE)."""

    def info(self, method: str) -> str:
        """The ``error_info`` Phorge gives for this problem on ``method``."""
        return str(self)


class InvalidParams(BadRequest):
    """``params`` is not a JSON object."""

    def info(self, method: str) -> str:
        return f"Invalid parameter information was passed to method '{method}'."


class RequestTooLarge(BadRequest):
    """The body, decompressed, is over the limit."""


JSON_BODY_REFUSED = (
    "Use form-encoded data to submit parameters to Conduit endpoints. Sending a "
    "JSON-encoded body and setting 'Content-Type': 'application/json' is not currently "
    "supported."
)


def _set_path(target: dict[str, Any], key: str, value: str) -> None:
    match = _KEY.match(key)
    if not match:
        target[key] = value
        return
    head, rest = match.group(1), match.group(2)
    parts = [head, *re.findall(r"\[([^\[\]]*)\]", rest)]
    node: Any = target
    for i, raw_part in enumerate(parts):
        part = str(len(node)) if raw_part == "" else raw_part  # PHP's name[] appends
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _listify(value: Any) -> Any:
    """PHP arrays with keys 0..n-1 are lists."""
    if isinstance(value, dict):
        converted = {k: _listify(v) for k, v in value.items()}
        keys = list(converted)
        if keys and keys == [str(i) for i in range(len(keys))]:
            return [converted[k] for k in keys]
        return converted
    return value


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """PHP-style decoding of form fields into nested params."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        _set_path(out, key, value)
    # The top level is always a map of parameter names, even when they look like 0, 1, 2.
    return {key: _listify(value) for key, value in out.items()}


def flatten(params: Mapping[str, Any] | list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """The inverse: nested params → PHP-style form fields."""
    pairs: list[tuple[str, str]] = []
    items = enumerate(params) if isinstance(params, list) else params.items()
    for key, value in items:
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping | list):
            pairs.extend(flatten(value, name))
        elif isinstance(value, bool):
            pairs.append((name, "true" if value else "false"))
        elif value is None:
            pairs.append((name, ""))
        else:
            pairs.append((name, str(value)))
    return pairs


@dataclasses.dataclass(frozen=True)
class Call:
    """A decoded Conduit call: its params (token removed), the token, and how it came."""

    params: dict[str, Any]
    token: str | None
    encoding: Encoding
    output: str | None = "json"

    def without_token(self) -> Call:
        return dataclasses.replace(self, token=None)

    def with_token(self, token: str) -> Call:
        return dataclasses.replace(self, token=token)

    def encode(self) -> tuple[bytes, str]:
        """Re-encode in the same style (body, content type)."""
        if self.encoding == "params-json":
            params = dict(self.params)
            if self.token is not None:
                params["__conduit__"] = {"token": self.token}
            pairs = [("params", json.dumps(params)), ("output", self.output or "json")]
            pairs.append(("__conduit__", "1"))
        elif self.encoding == "per-key-json":
            pairs = [(f"params[{k}]", json.dumps(v)) for k, v in self.params.items()]
            if self.token is not None:
                pairs.insert(0, ("api.token", self.token))
            pairs.append(("output", self.output or "json"))
        else:
            pairs = encode_form(self.params, self.token, self.output)
        return urlencode(pairs).encode(), "application/x-www-form-urlencoded"


def encode_form(
    params: Mapping[str, Any], token: str | None, output: str | None = "json"
) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if token is not None:
        pairs.append(("api.token", token))
    pairs.extend(flatten(params))
    if output:
        pairs.append(("output", output))
    return pairs


def encode_params_json(params: Mapping[str, Any], token: str | None) -> list[tuple[str, str]]:
    body = dict(params)
    if token is not None:
        body["__conduit__"] = {"token": token}
    return [("params", json.dumps(body)), ("output", "json"), ("__conduit__", "1")]


def decompress(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """gzip/deflate bodies (arcanist), never inflating past ``max_bytes``."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(body) > max_bytes:
            raise RequestTooLarge(f"request body over {max_bytes} bytes")
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequest("compressed body is corrupt") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise RequestTooLarge(f"request body over {max_bytes} bytes once decompressed")
    return out


def decode_request(  # noqa: PLR0912 - one branch per encoding and its token spelling
    http_method: str,
    content_type: str,
    body: bytes,
    query_string: str = "",
    *,
    content_encoding: str = "",
    max_bytes: int = 1 << 20,
) -> Call:
    """Read any Conduit request into a :class:`Call`. Raises :class:`BadRequest`."""
    if content_type.split(";", maxsplit=1)[0].strip().lower() == "application/json":
        raise BadRequest(JSON_BODY_REFUSED)
    raw = decompress(body, content_encoding, max_bytes) if body else b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not UTF-8") from exc
    pairs = parse_qsl(query_string, keep_blank_values=True) if query_string else []
    pairs += parse_qsl(text, keep_blank_values=True)
    if len(pairs) > 10_000:
        raise RequestTooLarge("too many form fields")
    form = parse_form(pairs)
    output = form.pop("output", None)
    token: str | None = None
    if "params" in form and isinstance(form["params"], str):
        encoding: Encoding = "params-json"
        form.pop("__conduit__", None)
        try:
            params = json.loads(form.pop("params"))
        except ValueError as exc:
            raise InvalidParams("invalid params") from exc
        if not isinstance(params, dict):
            raise InvalidParams("invalid params")
        meta = params.pop("__conduit__", None)
        if isinstance(meta, dict) and isinstance(meta.get("token"), str):
            token = meta["token"]
        raw_token = form.pop("api.token", None)
        if token is None and isinstance(raw_token, str):
            token = raw_token
        params.update(form)
    elif "params" in form and isinstance(form["params"], dict):
        encoding = "per-key-json"
        params = {}
        for key, value in form.pop("params").items():
            try:
                params[key] = json.loads(value) if isinstance(value, str) else value
            except ValueError as exc:
                raise InvalidParams("invalid params") from exc
        raw_token = form.pop("api.token", None)
        token = raw_token if isinstance(raw_token, str) else None
        params.update(form)
    else:
        encoding = "form"
        raw_token = form.pop("api.token", None)
        token = raw_token if isinstance(raw_token, str) else None
        params = form
    if token == "":
        token = None  # Phorge treats an empty token as absent
    return Call(
        params=params,
        token=token,
        encoding=encoding,
        output=output if isinstance(output, str) else None,
    )


def compress(body: bytes) -> bytes:
    return gzip.compress(body)
