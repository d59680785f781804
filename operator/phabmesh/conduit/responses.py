"""Conduit answers on the wire, as Phorge sends them: compression and headers. Pure: no I/O.

Phorge turns on PHP's ``zlib.output_compression`` for every response it writes
(``AphrontResponse::willBeginWrite``). PHP then picks the coding from the request's
``Accept-Encoding`` with two substring searches, case-sensitive, q-values ignored:
``gzip`` anywhere in the header gives a gzip body (``x-gzip`` included), else
``deflate`` anywhere gives a zlib-wrapped deflate body (RFC 1950, as PHP's
"deflate" is), else the body goes as it is. A compressed answer carries
``Content-Encoding`` (``gzip`` or ``deflate``) and ``Vary: Accept-Encoding``; an
uncompressed one carries neither. The bytes are zlib's at level 6 (PHP's default
level), byte for byte the recordings' (``tests/conduit/recordings/response.*``).

:func:`encode` does exactly that for the gateway and for the Conduit test server,
with one difference: a coding offered with ``q=0`` is taken as refused (RFC 9110),
where PHP would send it anyway. A client that says ``gzip;q=0`` gets an answer it
asked for (deflate or none) instead of one it said it cannot read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from collections.abc import Mapping
from typing import Any, Literal

Coding = Literal["gzip", "deflate"]

# The part of an Accept-Encoding header that is read. Real clients send a few dozen
# characters; the HTTP parser already bounds a header at 8 KiB. Past this, the rest is
# ignored (an answer then goes uncompressed, which every client reads).
MAX_ACCEPT_ENCODING_CHARS = 1024
# PHP's zlib.output_compression_level default (-1) is zlib's default, level 6.
LEVEL = 6
_WBITS: Mapping[str, int] = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Bodies larger than this are compressed or decompressed in a worker thread (zlib
# releases the GIL), so the event loop never stalls on a large answer.
THREAD_ABOVE_BYTES = 256 * 1024

# The headers Phorge puts on every Conduit answer, errors included, and the only
# response headers a Conduit client needs:
# - Content-Type: the answer is JSON (clients parse it as such);
# - X-Conduit-Capabilities: "gzip" tells arcanist it may gzip its request bodies;
# - Cache-Control and Expires: an answer carries private data, no cache on the way keeps it.
# Content-Encoding and Vary come from encode(). Everything else Phorge sends (Set-Cookie of
# an anonymous session, X-Powered-By, Content-Security-Policy and the other headers for
# browsers) means nothing to a Conduit client.
CONDUIT_HEADERS: Mapping[str, str] = {
    "Content-Type": "application/json",
    "X-Conduit-Capabilities": "gzip",
    "Cache-Control": "no-store",
    "Expires": "Sat, 01 Jan 2000 00:00:00 GMT",
}
VARY = "Accept-Encoding"


def php_json(value: Any) -> bytes:
    """JSON as Phorge writes an answer: PHP's ``json_encode`` (compact, slashes escaped,
    non-ASCII as ``\\u`` escapes), then ``<`` and ``>`` escaped against content sniffing
    (``AphrontResponse::encodeJSONForHTTPResponse``)."""
    text = json.dumps(value, separators=(",", ":")).replace("/", "\\/")
    return text.replace("<", "\\u003c").replace(">", "\\u003e").encode()


def envelope(result: Any = None, code: str | None = None, info: str | None = None) -> bytes:
    """Conduit's answer, byte for byte as Phorge writes it."""
    return php_json({"result": result, "error_code": code, "error_info": info})


class UnreadableBody(ValueError):
    """A compressed body that cannot be decoded: corrupt, or an unknown coding."""


class BodyTooLarge(ValueError):
    """A body over the size limit, compressed or decoded."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An answer's body as sent, and the headers that say how it is encoded."""

    body: bytes | bytearray
    coding: Coding | None

    @property
    def headers(self) -> dict[str, str]:
        """``Content-Encoding`` and ``Vary`` when compressed; none when not (as PHP)."""
        if self.coding is None:
            return {}
        return {"Content-Encoding": self.coding, "Vary": VARY}


def negotiate(accept_encoding: str | None) -> Coding | None:
    """The coding PHP's zlib.output_compression picks for this ``Accept-Encoding``.

    ``gzip`` if an element contains "gzip", else ``deflate`` if one contains "deflate",
    else None (send as is). Case-sensitive, like PHP's ``strstr``; an element whose
    ``q`` is 0 does not count. Linear in the header, of which at most
    :data:`MAX_ACCEPT_ENCODING_CHARS` characters are read.
    """
    if not accept_encoding:
        return None
    offered: set[str] = set()
    for element in accept_encoding[:MAX_ACCEPT_ENCODING_CHARS].split(","):
        if _refused(element):
            continue
        for coding in ("gzip", "deflate"):
            if coding in element:
                offered.add(coding)
    if "gzip" in offered:
        return "gzip"
    if "deflate" in offered:
        return "deflate"
    return None


def _refused(element: str) -> bool:
    """``coding;q=0`` (or ``q=0.0``, ``q=0.000``): the client says it cannot take it."""
    for param in element.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            head, _, fraction = value.partition(".")
            return head == "0" and len(fraction) <= 3 and fraction.strip("0") == ""
    return False


def compress(body: bytes | bytearray, coding: Coding) -> bytes:
    """``body`` as PHP's zlib.output_compression writes it (level 6; gzip: mtime 0, OS unix)."""
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, _WBITS[coding])
    return compressor.compress(body) + compressor.flush()


def encode(body: bytes | bytearray, accept_encoding: str | None) -> Encoded:
    """The body as Phorge would send it to a client that sent this ``Accept-Encoding``."""
    coding = negotiate(accept_encoding)
    if coding is None:
        return Encoded(body, None)
    return Encoded(compress(body, coding), coding)


async def encode_async(body: bytes | bytearray, accept_encoding: str | None) -> Encoded:
    """:func:`encode`, in a worker thread when the body is large."""
    if len(body) > THREAD_ABOVE_BYTES and negotiate(accept_encoding) is not None:
        return await asyncio.to_thread(encode, body, accept_encoding)
    return encode(body, accept_encoding)


class Inflation:
    """A response body as sent with this ``Content-Encoding``, decoded in steps of bounded
    size, never past ``max_bytes``: whoever holds the body can reserve each step's bytes
    before they exist (the gateway's answer budget), and stop between two.

    Takes ``gzip``/``x-gzip`` and ``deflate``, zlib-wrapped (as PHP sends it) or raw (as
    some servers do), and ``identity`` (nothing to do: :attr:`done` at once). Raises
    :class:`BodyTooLarge` or :class:`UnreadableBody`, from the constructor or a step. A step
    may run in a worker thread (zlib releases the GIL), one at a time.
    """

    def __init__(
        self, body: bytes | bytearray, content_encoding: str | None, max_bytes: int
    ) -> None:
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(body) > max_bytes:
            raise BodyTooLarge(f"body over {max_bytes} bytes")
        self.body = body
        self.max_bytes = max_bytes
        self._out = bytearray()  # grown in place: never a second copy of what is inflated
        self._pending = body  # what is still to inflate
        self._inflater: Any = None
        self.done = not codings
        if self.done:
            return
        if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
            raise UnreadableBody(f"unsupported Content-Encoding {content_encoding!r}")
        self.coding = codings[0]
        if self.coding == "deflate":
            wbits = zlib.MAX_WBITS if _zlib_wrapped(body) else -zlib.MAX_WBITS
        else:
            wbits = 16 + zlib.MAX_WBITS
        self._inflater = zlib.decompressobj(wbits)

    def step(self, at_most: int) -> int:
        """Inflate at most ``at_most`` (> 0) more bytes; how many it inflated."""
        if at_most <= 0:  # zlib would take 0 as no bound at all
            raise ValueError(f"a step of {at_most} bytes")
        asked = min(at_most, self.max_bytes + 1 - len(self._out))
        try:
            chunk = self._inflater.decompress(self._pending, asked)
        except zlib.error as exc:
            raise UnreadableBody(f"corrupt {self.coding} body") from exc
        self._pending = self._inflater.unconsumed_tail
        self._out += chunk
        if len(self._out) > self.max_bytes:
            raise BodyTooLarge(f"body over {self.max_bytes} bytes once decompressed")
        if self._inflater.eof:
            self.done = True
        elif not self._pending and len(chunk) < asked:  # all of it read, and not the end
            raise UnreadableBody(f"truncated {self.coding} body")
        return len(chunk)

    @property
    def result(self) -> bytes | bytearray:
        """The body decoded, once :attr:`done`."""
        return self.body if self._inflater is None else self._out


def decode(
    body: bytes | bytearray, content_encoding: str | None, max_bytes: int
) -> bytes | bytearray:
    """A response body as sent with this ``Content-Encoding``, decoded in one go, never past
    ``max_bytes`` (:class:`Inflation`)."""
    inflation = Inflation(body, content_encoding, max_bytes)
    while not inflation.done:
        inflation.step(max_bytes + 1)
    return inflation.result


def _zlib_wrapped(body: bytes | bytearray) -> bool:
    """RFC 1950's two-byte header: method 8, and the check bits."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
