"""Conduit's error envelope as a small exception tree.

Only :class:`PhabricatorUnavailable` is retryable (transport errors, HTTP 5xx or
429, a body that is not Conduit JSON); every error Conduit itself answers is
permanent for that call. Messages never carry a token: Phorge echoes a refused
token inside ``error_info``, so the client masks it before raising.
"""

from __future__ import annotations


class ConduitError(Exception):
    """Conduit answered with an error envelope."""

    retryable = False

    def __init__(self, code: str, info: str) -> None:
        super().__init__(f"{code}: {info}")
        self.code = code
        self.info = info


class InvalidSession(ConduitError):
    """ERR-INVALID-SESSION: no token at all."""


class InvalidAuth(ConduitError):
    """ERR-INVALID-AUTH: malformed, unknown, expired or terminated token; disabled account."""


class CallError(ConduitError):
    """ERR-CONDUIT-CALL: unknown method or unknown parameter."""


class CoreError(ConduitError):
    """ERR-CONDUIT-CORE and other ERR- codes: bad values, policy denials, paging limits."""


class PhabricatorUnavailable(ConduitError):
    """Phabricator could not be reached or is broken (retryable).

    Transport errors and timeouts, HTTP 5xx, 429 (rate limited), or an answer that
    is not Conduit's JSON envelope; ``status`` is the HTTP status when there was one.
    The client raises it only once its retries are spent.
    """

    retryable = True

    def __init__(self, code: str, info: str, *, status: int | None = None) -> None:
        super().__init__(code, info)
        self.status = status


UNAVAILABLE = "ERR-UNAVAILABLE"  # not Phorge's: the code of PhabricatorUnavailable


def error_for(code: str, info: str) -> ConduitError:
    """The exception for an error envelope's ``error_code`` (never PhabricatorUnavailable)."""
    cls: type[ConduitError] = {
        "ERR-INVALID-SESSION": InvalidSession,
        "ERR-INVALID-AUTH": InvalidAuth,
        "ERR-CONDUIT-CALL": CallError,
    }.get(code, CoreError)
    return cls(code, info)
