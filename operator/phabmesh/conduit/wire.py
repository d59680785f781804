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
import pickle
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from phabmesh import logs

Encoding = Literal["form", "params-json", "per-key-json"]
# How much of a refused value (or name) an error_info echoes.
ECHO_CHARS = 256
# Deepest form field name (``a[b][c]`` nests 2): PHP's default max_input_nesting_level. Phorge
# itself reads deeper names, differently past a few thousand levels; real clients nest two or
# three. Deeper is refused rather than forwarded, so the gateway never reads a field other
# than as Phorge does.
MAX_NESTING = 64
# Most form fields in one request (body and query string together).
MAX_FIELDS = 10_000
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class BadRequest(ValueError):
    """The body cannot be read as a Conduit call (Phorge answers ERR-CONDUIT-CORE)."""

    def info(self, method: str) -> str:
        """The ``error_info`` Phorge gives for this problem on ``method``."""
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as it is (from the gateway's worker process), whatever its __init__ takes.
        return (_rebuild, (type(self), self.args))


def _rebuild(cls: type[BadRequest], args: tuple[Any, ...]) -> BadRequest:
    error = cls.__new__(cls)
    error.args = args
    return error


class InvalidParams(BadRequest):
    """``params`` is not a JSON object."""

    def info(self, method: str) -> str:
        return f"Invalid parameter information was passed to method '{method}'."


class InvalidParamValue(BadRequest):
    """A ``params[key]`` field of the web console's encoding is not JSON.

    Phorge echoes the whole value; we echo at most :data:`ECHO_CHARS` of it (and of the key),
    so that an answer and its audit line stay small whatever was sent.
    """

    def __init__(self, key: str, value: str) -> None:
        super().__init__(
            f"The value for parameter '{logs.clip(key, ECHO_CHARS)}' is not valid JSON. All "
            "parameters must be encoded as JSON values, including strings (which means you "
            "need to surround them in double quotes). Check your syntax. Value was: "
            f"{logs.clip(value, ECHO_CHARS)}."
        )


class NestedTooDeep(BadRequest):
    """A form field's name nests deeper than :data:`MAX_NESTING` brackets."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"phabmesh: the form field '{logs.clip(key, ECHO_CHARS)}' nests deeper than "
            f"{MAX_NESTING} levels"
        )


class RequestTooLarge(BadRequest):
    """The body, decompressed, is over the limit."""


JSON_BODY_REFUSED = (
    "Use form-encoded data to submit parameters to Conduit endpoints. Sending a "
    "JSON-encoded body and setting 'Content-Type': 'application/json' is not currently "
    "supported."
)


def _set_path(target: dict[str, Any], key: str, value: str) -> None:
    if key.count("[") > MAX_NESTING:
        raise NestedTooDeep(key)
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
    """PHP arrays with keys 0..n-1 are lists. Iterative: keys may nest thousands deep."""
    if not isinstance(value, dict):
        return value
    root: dict[str, Any] = {"": value}
    # Post-order over the dicts: a parent is converted after all of its children.
    pending: list[tuple[dict[str, Any], bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if not children_done:
            pending.append((node, True))
            pending.extend((child, False) for child in node.values() if isinstance(child, dict))
            continue
        for key, child in node.items():
            if isinstance(child, dict) and child:
                keys = list(child)
                if keys == [str(i) for i in range(len(keys))]:
                    node[key] = list(child.values())
    return root[""]


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """PHP-style decoding of form fields into nested params."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        _set_path(out, key, value)
    # The top level is always a map of parameter names, even when they look like 0, 1, 2.
    return {key: _listify(value) for key, value in out.items()}


def flatten(params: Mapping[str, Any] | list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """The inverse: nested params → PHP-style form fields.

    Iterative, and each field's name is joined once from its path, so the work is linear in
    the output however deep the params nest.
    """
    pairs: list[tuple[str, str]] = []
    path: list[str] = [prefix] if prefix else []
    # A stack of iterators over (key, value); ``path`` holds the names leading to the top one.
    stack: list[Iterator[tuple[Any, Any]]] = [_items(params)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            if stack:  # back from a nested value to its parent
                path.pop()
            continue
        key, value = entry
        part = f"[{key}]" if path else str(key)
        if isinstance(value, Mapping | list):
            path.append(part)
            stack.append(_items(value))
            continue
        name = "".join(path) + part
        if isinstance(value, bool):
            pairs.append((name, "true" if value else "false"))
        elif value is None:
            pairs.append((name, ""))
        else:
            pairs.append((name, str(value)))
    return pairs


def _items(value: Mapping[str, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    return iter(enumerate(value)) if isinstance(value, list) else iter(value.items())


@dataclasses.dataclass(frozen=True)
class Call:
    """A decoded Conduit call: its params (token removed), the token, and how it came."""

    params: dict[str, Any]
    token: str | None
    encoding: Encoding
    output: str | None = "json"
    # Bytes of the form it was read from (inflated): a hint of what re-encoding it costs.
    size: int = 0
    # The params pickled, when a worker process decoded them and kept them as bytes (see
    # decode_packed): ``params`` is empty then, and encoding unpacks them first.
    packed: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def strict(self) -> bool:
        """Phorge types JSON-encoded params strictly; form fields are loosely typed strings."""
        return self.encoding != "form"

    # Made directly, not by dataclasses.replace (which looks the fields up every time): once
    # or twice a call on the gateway's event loop.
    def without_token(self) -> Call:
        return Call(self.params, None, self.encoding, self.output, self.size, self.packed)

    def with_token(self, token: str) -> Call:
        return Call(self.params, token, self.encoding, self.output, self.size, self.packed)

    def encode(self) -> tuple[bytes, str]:
        """Re-encode in the same style (body, content type)."""
        if self.packed is not None:
            return self.unpacked().encode()
        pairs = encode(self.params, self.token, self.encoding, self.output)
        return urlencode(pairs).encode(), FORM_CONTENT_TYPE

    def unpacked(self) -> Call:
        """This call with its params decoded (from :attr:`packed`, made by decode_packed)."""
        if self.packed is None:
            return self
        params = pickle.loads(self.packed)  # noqa: S301 - pickled by decode_packed, never sent
        return dataclasses.replace(self, params=params, packed=None)


FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def encode(
    params: Mapping[str, Any],
    token: str | None,
    encoding: Encoding = "form",
    output: str | None = "json",
) -> list[tuple[str, str]]:
    """Form fields for a call in any of the three encodings (see the module docstring)."""
    if encoding == "params-json":
        return encode_params_json(params, token, output)
    if encoding == "per-key-json":
        return encode_per_key_json(params, token, output)
    return encode_form(params, token, output)


def encode_form(
    params: Mapping[str, Any], token: str | None, output: str | None = "json"
) -> list[tuple[str, str]]:
    """Flat PHP-style fields: ``api.token=...&constraints[usernames][0]=x&output=json``."""
    pairs: list[tuple[str, str]] = []
    if token is not None:
        pairs.append(("api.token", token))
    pairs.extend(flatten(params))
    if output:
        pairs.append(("output", output))
    return pairs


def encode_params_json(
    params: Mapping[str, Any], token: str | None, output: str | None = "json"
) -> list[tuple[str, str]]:
    """Arcanist's ``params=<json>&output=json&__conduit__=1``, the token in ``__conduit__``."""
    body = dict(params)
    if token is not None:
        body["__conduit__"] = {"token": token}
    return [("params", json.dumps(body)), ("output", output or "json"), ("__conduit__", "1")]


def encode_per_key_json(
    params: Mapping[str, Any], token: str | None, output: str | None = "json"
) -> list[tuple[str, str]]:
    """The web console's ``params[key]=<json>``.

    Phorge reads metadata only from ``params[__conduit__]`` in this encoding (an
    ``api.token`` field beside it is ignored), so the token goes there.
    """
    pairs = [(f"params[{key}]", json.dumps(value)) for key, value in params.items()]
    if token is not None:
        pairs.append(("params[__conduit__]", json.dumps({"token": token})))
    if output:
        pairs.append(("output", output))
    return pairs


# The Content-Encodings of a request body that decompress reads.
COMPRESSED = frozenset({"gzip", "x-gzip", "deflate"})


def decompress(body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    """gzip/deflate bodies (arcanist), never inflating past ``max_bytes``."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(body) > max_bytes:
            raise RequestTooLarge(f"request body over {max_bytes} bytes")
        return body
    if encoding not in COMPRESSED:
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


def decode_request(
    http_method: str,
    content_type: str,
    body: bytes,
    query_string: str = "",
    *,
    content_encoding: str = "",
    max_bytes: int = 1 << 20,
) -> Call:
    """Read any Conduit request into a :class:`Call`, as Phorge reads it.

    Raises :class:`BadRequest` where Phorge answers ERR-CONDUIT-CORE before even
    looking the method up. ``http_method`` does not matter: Phorge reads a GET's
    body like a POST's, and the query string under it.
    """
    del http_method
    raw = _form_bytes(content_type, body, content_encoding, max_bytes)
    call = _decode_form(raw, query_string)
    size = len(raw) + len(query_string)
    return Call(call.params, call.token, call.encoding, call.output, size, call.packed)


def decode_packed(*args: Any, **kwargs: Any) -> Call:
    """:func:`decode_request` with the params left pickled in :attr:`Call.packed`.

    For a worker process: its caller gets the token and the encoding as small values and
    the params as bytes it can hand back for encoding, never building them itself.
    """
    call = decode_request(*args, **kwargs)
    packed = pickle.dumps(call.params, protocol=pickle.HIGHEST_PROTOCOL)
    return dataclasses.replace(call, params={}, packed=packed)


def _form_bytes(content_type: str, body: bytes, content_encoding: str, max_bytes: int) -> bytes:
    # Phorge compares the whole header: "application/json; charset=utf-8" is read as a form.
    if content_type.strip().lower() == "application/json":
        raise BadRequest(JSON_BODY_REFUSED)
    return decompress(body, content_encoding, max_bytes) if body else b""


def _decode_form(raw: bytes, query_string: str) -> Call:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("request body is not UTF-8") from exc
    # Counted before parsing (parse_qsl splits fields on "&" only): the bound costs nothing.
    if _fields(text) + _fields(query_string) > MAX_FIELDS:
        raise RequestTooLarge("too many form fields")
    body_pairs = parse_qsl(text, keep_blank_values=True)
    query_pairs = parse_qsl(query_string, keep_blank_values=True) if query_string else []
    form = parse_form(body_pairs)
    for key, value in parse_form(query_pairs).items():
        form.setdefault(key, value)  # PHP's $_POST + $query: the body wins, key by key
    output = form.get("output")
    output = output if isinstance(output, str) else None
    per_key = form.get("params")
    if isinstance(per_key, list):
        per_key = {str(i): v for i, v in enumerate(per_key)}
    if isinstance(per_key, dict):
        return _from_json_params(_decode_per_key(per_key), "per-key-json", output)
    if isinstance(per_key, str) and per_key:
        try:
            decoded = json.loads(per_key)
        except (ValueError, RecursionError) as exc:  # nested past the parser's depth
            raise InvalidParams("invalid params") from exc
        if isinstance(decoded, list):
            decoded = {str(i): v for i, v in enumerate(decoded)}
        if not isinstance(decoded, dict):
            raise InvalidParams("invalid params")
        return _from_json_params(decoded, "params-json", output)
    return _from_form(form, output)


def _fields(form: str) -> int:
    """At least as many as the fields parse_qsl finds in ``form``."""
    return form.count("&") + 1 if form else 0


def _from_form(form: dict[str, Any], output: str | None) -> Call:
    """Plain form fields: "__"-prefixed names are dropped; "api.*" and a few others are metadata."""
    params: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for key, value in form.items():
        if key.startswith("__"):
            continue
        if key.startswith("api."):
            metadata[key[4:]] = value
        elif key in METADATA_KEYS:
            metadata[key] = value
        else:
            params[key] = value
    return Call(params=params, token=_token(metadata), encoding="form", output=output)


# Form fields Phorge always treats as request metadata, never as method parameters.
METADATA_KEYS = frozenset({"access_token", "scope", "output", "__conduit__", "code", "params"})


def _decode_per_key(fields: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise InvalidParamValue(key, "(nested fields)")
        source = value or "null"  # an empty box in the web console means null
        try:
            params[key] = json.loads(source)
        except (ValueError, RecursionError) as exc:
            raise InvalidParamValue(key, value) from exc
        if params[key] is None and source.lower() != "null":
            raise InvalidParamValue(key, value)
    return params


def _from_json_params(params: dict[str, Any], encoding: Encoding, output: str | None) -> Call:
    """JSON-encoded params: metadata (the token) comes only from ``__conduit__`` inside."""
    metadata = params.pop("__conduit__", None)
    token = _token(metadata) if isinstance(metadata, dict) else None
    return Call(params=params, token=token, encoding=encoding, output=output)


def _token(metadata: Mapping[str, Any]) -> str | None:
    value = metadata.get("token")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    token = str(value)
    return token or None  # Phorge treats an empty token as absent


def compress(body: bytes) -> bytes:
    return gzip.compress(body)
