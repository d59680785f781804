"""A Conduit client (requests): explicit timeouts, bounded retries, typed errors.

Retries (jittered exponential backoff) happen only on transport errors and HTTP
5xx/429; a Conduit error envelope is an answer and is never retried. Tokens
never reach logs or exception messages.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import requests
import structlog

from phabmesh.conduit import wire
from phabmesh.conduit.errors import ConduitError, PhabricatorUnavailable, error_for

log = structlog.get_logger(__name__)

_TOKEN = re.compile(r"\b(api|cli|clr)-[A-Za-z0-9]+")


def mask_tokens(text: str) -> str:
    return _TOKEN.sub("[REDACTED]", text)


@dataclasses.dataclass(frozen=True)
class WhoAmI:
    phid: str
    username: str
    real_name: str
    roles: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class User:
    id: int
    phid: str
    username: str
    real_name: str
    roles: tuple[str, ...]

    @property
    def is_bot(self) -> bool:
        return "bot" in self.roles

    @property
    def is_disabled(self) -> bool:
        return "disabled" in self.roles


class ConduitClient:
    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = 10.0,
        attempts: int = 3,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        encoding: wire.Encoding = "form",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep
        self.encoding = encoding

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, token: str | None = None
    ) -> Any:
        """Call ``method``; return its ``result`` or raise a :class:`ConduitError`."""
        call = wire.Call(dict(params or {}), token, self.encoding)
        body, content_type = call.encode()
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                resp = self.session.post(
                    f"{self.base_url}/api/{method}",
                    data=body,
                    headers={"Content-Type": content_type},
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                error: ConduitError = PhabricatorUnavailable(
                    "ERR-UNAVAILABLE", f"{type(exc).__name__} calling {method}"
                )
            else:
                if resp.status_code < 500 and resp.status_code != 429:
                    return self._result(method, resp)
                error = PhabricatorUnavailable(
                    "ERR-UNAVAILABLE", f"HTTP {resp.status_code} from {method}"
                )
            log.warning("conduit_call_failed", method=method, attempt=attempt, error=str(error))
            if attempt < self.attempts:
                self.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
                delay *= 2
        raise error

    def _result(self, method: str, resp: requests.Response) -> Any:
        try:
            envelope = json.loads(resp.text)
        except ValueError as exc:
            raise PhabricatorUnavailable(
                "ERR-UNAVAILABLE", f"{method} answered HTTP {resp.status_code} without Conduit JSON"
            ) from exc
        if not isinstance(envelope, dict) or "error_code" not in envelope:
            raise PhabricatorUnavailable("ERR-UNAVAILABLE", f"{method} answered no envelope")
        code = envelope.get("error_code")
        if code:
            raise error_for(str(code), mask_tokens(str(envelope.get("error_info") or "")))
        return envelope.get("result")

    # -- typed helpers --------------------------------------------------------------------

    def ping(self) -> str:
        return str(self.call("conduit.ping"))

    def whoami(self, token: str) -> WhoAmI:
        result = self.call("user.whoami", token=token)
        return WhoAmI(
            phid=str(result["phid"]),
            username=str(result["userName"]),
            real_name=str(result.get("realName") or ""),
            roles=tuple(result.get("roles") or ()),
        )

    def user_search(
        self,
        token: str,
        constraints: Mapping[str, Sequence[str] | bool | str] | None = None,
        *,
        limit: int = 100,
        max_pages: int = 100,
    ) -> list[User]:
        """Every matching user, following ``cursor.after`` page by page."""
        users: list[User] = []
        after: str | None = None
        for _ in range(max_pages):
            params: dict[str, Any] = {"constraints": dict(constraints or {}), "limit": limit}
            if after is not None:
                params["after"] = after
            result = self.call("user.search", params, token=token)
            for item in result.get("data") or []:
                fields = item.get("fields") or {}
                users.append(
                    User(
                        id=int(item["id"]),
                        phid=str(item["phid"]),
                        username=str(fields.get("username", "")),
                        real_name=str(fields.get("realName", "")),
                        roles=tuple(fields.get("roles") or ()),
                    )
                )
            after = (result.get("cursor") or {}).get("after")
            if after is None:
                return users
        return users
