"""A Conduit client (requests): explicit timeouts, bounded retries, typed errors.

Synchronous on purpose: the controller runs it in a thread executor. Retries
(jittered exponential backoff) happen only on transport errors and HTTP 5xx/429;
a Conduit error envelope is an answer and is never retried. Tokens never reach
logs, exception messages or reprs: Phorge echoes a refused token in
``error_info``, so the client removes it before raising.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
import structlog

from phabmesh import backoff, neterrors
from phabmesh.backoff import Backoff, parse_retry_after
from phabmesh.conduit import wire
from phabmesh.conduit.errors import (
    UNAVAILABLE,
    CoreError,
    PhabricatorUnavailable,
    error_for,
)
from phabmesh.logs import redact_text

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class WhoAmI:
    """``user.whoami``: whose token it is. Its roles say ``agent`` for a bot."""

    phid: str
    username: str
    real_name: str
    roles: tuple[str, ...]

    @property
    def is_bot(self) -> bool:
        return "agent" in self.roles or "bot" in self.roles

    @property
    def is_disabled(self) -> bool:
        return "disabled" in self.roles


@dataclasses.dataclass(frozen=True)
class User:
    """One ``user.search`` result."""

    id: int
    phid: str
    username: str
    real_name: str
    roles: tuple[str, ...]
    date_created: int | None = None
    date_modified: int | None = None

    @property
    def is_bot(self) -> bool:
        return "bot" in self.roles

    @property
    def is_disabled(self) -> bool:
        return "disabled" in self.roles

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @classmethod
    def from_result(cls, item: Mapping[str, Any]) -> User:
        fields = item.get("fields") or {}
        created, modified = fields.get("dateCreated"), fields.get("dateModified")
        return cls(
            id=int(item["id"]),
            phid=str(item["phid"]),
            username=str(fields.get("username", "")),
            real_name=str(fields.get("realName", "")),
            roles=tuple(str(r) for r in fields.get("roles") or ()),
            date_created=int(created) if created is not None else None,
            date_modified=int(modified) if modified is not None else None,
        )


Constraints = Mapping[str, Sequence[str] | Sequence[int] | bool | str | int]


class ConduitClient:
    """Calls one Phabricator/Phorge's Conduit API.

    ``timeout`` is requests' ``(connect, read)`` (or one number for both), passed
    on every call. At most ``attempts`` tries per call; between them the client waits as
    ``policy`` (the process's retry policy, :mod:`phabmesh.backoff`) says: its first pause,
    doubling, at most its cap, less up to half at random, or what a 429's or 503's
    ``Retry-After`` asks within the same cap;
    with ``deadline`` it also stops retrying once that many seconds have gone by.
    ``sleep``, ``clock`` and ``jitter`` are there for tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = (3.05, 10.0),
        attempts: int = 3,
        policy: Backoff = backoff.DEFAULT,
        deadline: float | None = None,
        encoding: wire.Encoding = "form",
        compress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.policy = policy
        self.deadline = deadline
        self.encoding = encoding
        self.compress = compress
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter

    def __repr__(self) -> str:
        return f"ConduitClient({self.base_url!r}, encoding={self.encoding!r})"

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, token: str | None = None
    ) -> Any:
        """Call ``method``; return its ``result`` or raise a :class:`ConduitError`."""
        body = urlencode(wire.encode(dict(params or {}), token, self.encoding)).encode()
        headers = {"Content-Type": wire.FORM_CONTENT_TYPE}
        if self.compress:
            body = wire.compress(body)
            headers["Content-Encoding"] = "gzip"
        started = self.clock()
        for attempt in range(1, self.attempts + 1):
            try:
                return self._attempt(method, body, headers, token)
            except _Retryable as failure:
                error, delay = failure.error, self._delay(attempt, failure.retry_after)
                error.__cause__ = failure.__cause__  # the transport error, if any
            retrying = attempt < self.attempts and (
                self.deadline is None or self.clock() - started + delay < self.deadline
            )
            log.warning(
                "conduit_call_failed",
                method=method,
                attempt=attempt,
                status=error.status,
                error=error.info,
                retrying=retrying,
            )
            if not retrying:
                raise error
            self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self, method: str, body: bytes, headers: Mapping[str, str], token: str | None
    ) -> Any:
        """One request: its result, or :class:`_Retryable`, or a permanent ConduitError."""
        try:
            resp = self.session.post(
                f"{self.base_url}/api/{method}",
                data=body,
                headers=dict(headers),
                timeout=self.timeout,
                # The body carries a bot's token: never re-sent to wherever a 307/308 points,
                # and a 301/302's target never answers as if it were Phabricator.
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            kind = "timeout" if isinstance(exc, requests.Timeout) else "transport error"
            timeout = self.timeout if isinstance(self.timeout, float | int) else None
            raise _Retryable(
                PhabricatorUnavailable(
                    UNAVAILABLE,
                    f"{kind} calling {method} at {self.base_url}: "
                    f"{neterrors.cause(exc, timeout)} (check the Phabricator URL, "
                    "PHABMESH_PHABRICATOR_URL)",
                )
            ) from exc
        if resp.is_redirect or 300 <= resp.status_code < 400:
            raise PhabricatorUnavailable(
                UNAVAILABLE,
                f"{method} answered HTTP {resp.status_code}, a redirect"
                f"{redirect_target(resp.headers.get('Location'))}: not followed (set the "
                "Phabricator URL to where Conduit answers)",
                status=resp.status_code,
            )
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retryable(
                PhabricatorUnavailable(
                    UNAVAILABLE, f"HTTP {resp.status_code} from {method}", status=resp.status_code
                ),
                _retry_after(resp),
            )
        return self._result(method, resp, token)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        return self.policy.delay(attempt, retry_after, self.jitter)

    @staticmethod
    def _result(method: str, resp: requests.Response, token: str | None) -> Any:
        try:
            envelope = json.loads(resp.text)
        except ValueError as exc:
            raise PhabricatorUnavailable(
                UNAVAILABLE,
                f"{method} answered HTTP {resp.status_code} without Conduit JSON",
                status=resp.status_code,
            ) from exc
        if not isinstance(envelope, dict) or "error_code" not in envelope:
            raise PhabricatorUnavailable(
                UNAVAILABLE, f"{method} answered no Conduit envelope", status=resp.status_code
            )
        code = envelope.get("error_code")
        if code:
            info = redact_text(str(envelope.get("error_info") or ""), token)
            raise error_for(str(code), info)
        return envelope.get("result")

    # -- typed helpers --------------------------------------------------------------------

    def ping(self) -> str:
        """``conduit.ping`` (no token): the server's host name."""
        return str(self.call("conduit.ping"))

    def whoami(self, token: str) -> WhoAmI:
        result = self.call("user.whoami", token=token)
        return WhoAmI(
            phid=str(result["phid"]),
            username=str(result["userName"]),
            real_name=str(result.get("realName") or ""),
            roles=tuple(str(r) for r in result.get("roles") or ()),
        )

    def user_search(
        self,
        token: str,
        constraints: Constraints | None = None,
        *,
        query_key: str | None = None,
        limit: int = 100,
        max_pages: int = 100,
    ) -> list[User]:
        """Every matching user, following ``cursor.after`` page by page.

        Raises :class:`CoreError` (``ERR-TOO-MANY-PAGES``) rather than return a
        partial list when there are more than ``max_pages`` pages.
        """
        users: list[User] = []
        after: str | None = None
        for _ in range(max_pages):
            params: dict[str, Any] = {"limit": limit}
            if constraints:
                params["constraints"] = dict(constraints)
            if query_key is not None:
                params["queryKey"] = query_key
            if after is not None:
                params["after"] = after
            result = self.call("user.search", params, token=token)
            users.extend(User.from_result(item) for item in result.get("data") or [])
            cursor = result.get("cursor") or {}
            if cursor.get("after") is None:
                return users
            after = str(cursor["after"])
        raise CoreError("ERR-TOO-MANY-PAGES", f"user.search has more than {max_pages} pages")


class _Retryable(Exception):
    """An attempt failed in a way worth another (never leaves the client)."""

    def __init__(self, error: PhabricatorUnavailable, retry_after: float | None = None) -> None:
        super().__init__(error.info)
        self.error = error
        self.retry_after = retry_after


def redirect_target(location: str | None) -> str:
    """`` to <host>`` for a redirect's Location (its host alone: never a path or query, which
    could carry anything), or nothing when it names none."""
    if not location:
        return ""
    try:
        host = urlsplit(location).hostname
    except ValueError:
        return ""
    return f" to {host[:253]}" if host else " to a path on the same host"


def _retry_after(resp: requests.Response) -> float | None:
    return parse_retry_after(resp.headers.get("Retry-After"))
