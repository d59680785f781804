"""What went wrong with a connection, in a few words, for messages that name the URL. Pure.

The system says it best ("Connection refused", "Name or service not known", "No route to
host"): the words of the ``[Errno N]`` an exception carries, when it carries one, else a
timeout said as one, else the exception's kind.
"""

from __future__ import annotations

import re

import requests

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def cause(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {timeout:g} s" if timeout else "connection timed out"
    if isinstance(exc, requests.ReadTimeout | TimeoutError):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    found = _ERRNO.search(str(exc))
    if found:
        return found.group(1).strip()
    return type(exc).__name__
