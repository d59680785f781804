"""The pod side: exchange the projected service-account token for a credential.

``phabmesh credential`` reads the token file, calls the credential endpoint and
writes the credential to a file (mode 0600, replaced atomically). With
``--watch`` it keeps the file fresh before expiry (sidecar mode) and survives
endpoint restarts with backoff. It never prints the credential unless asked to
with ``--print``. ``--format phorge-token`` (``api-`` and 28 characters, what
Conduit clients expect of a token) or ``--format jwt``; without it, the binding's
``credentialFormat`` decides (by default the Phorge-shaped token).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import structlog

from phabmesh import backoff, neterrors
from phabmesh.backoff import Backoff, parse_retry_after
from phabmesh.clock import Clock, utcnow

log = structlog.get_logger(__name__)

DEFAULT_TOKEN_FILE = "/var/run/secrets/phabmesh.io/serviceaccount/token"  # noqa: S105 - a path
DEFAULT_ENDPOINT = "http://phabmesh-endpoint.phabmesh-system.svc:8443"
FORMATS = ("phorge-token", "jwt")


class ExchangeError(Exception):
    """The endpoint refused or could not be reached. ``retryable`` says whether to retry,
    ``retry_after`` when (the endpoint's ``Retry-After`` on a 429 or 503)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Credential:
    token: str = dataclasses.field(repr=False)
    expires_at: datetime.datetime
    identity: str
    binding: str
    bot: str
    format: str = ""  # "phorge-token" or "jwt"


def exchange(
    endpoint: str,
    service_account_token: str,
    *,
    binding: str | None = None,
    credential_format: str | None = None,
    session: requests.Session | None = None,
    timeout: float = 10.0,
    source: str = "",
) -> Credential:
    """One exchange. ``source`` says where ``endpoint`` came from (a flag, a variable, the
    default), for the message when it cannot be reached."""
    if session is None:
        with requests.Session() as own:
            return exchange(
                endpoint,
                service_account_token,
                binding=binding,
                credential_format=credential_format,
                session=own,
                timeout=timeout,
                source=source,
            )
    params = {"binding": binding} if binding else {}
    if credential_format:
        params["format"] = credential_format
    try:
        resp = session.post(
            endpoint.rstrip("/") + "/v1/credentials",
            headers={"Authorization": f"Bearer {service_account_token}"},
            params=params or None,
            timeout=timeout,
        )
    except requests.RequestException as exc:
        where = f" ({source})" if source else ""
        raise ExchangeError(
            f"credential endpoint {endpoint}{where} unreachable: {neterrors.cause(exc, timeout)}"
        ) from exc
    try:
        body: dict[str, Any] = resp.json()
    except ValueError:
        body = {}
    if resp.status_code != 200:
        message = body.get("message") or resp.reason or "error"
        retryable = resp.status_code >= 500 or resp.status_code in (403, 429)
        raise ExchangeError(
            f"{resp.status_code} {body.get('error', '')}: {message}",
            status=resp.status_code,
            retryable=retryable,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )
    expires = datetime.datetime.fromisoformat(str(body["expiresAt"]).replace("Z", "+00:00"))
    return Credential(
        token=str(body["credential"]),
        expires_at=expires,
        identity=str(body.get("identity", "")),
        binding=str(body.get("binding", "")),
        bot=str(body.get("bot", "")),
        format=str(body.get("format", "")),
    )


def write_atomically(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refresh_delay(credential: Credential, now: datetime.datetime) -> float:
    """Refresh when a third of the remaining life is left, and never later than 30 s before."""
    left = (credential.expires_at - now).total_seconds()
    return max(1.0, min(left * 2 / 3, left - 30))


def watch(
    fetch: Callable[[], Credential],
    store: Callable[[Credential], None],
    *,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    now: Clock = utcnow,
    policy: Backoff = backoff.DEFAULT,
) -> None:
    """Keep a fresh credential stored until ``stop()``; retry failures after the pauses of
    ``policy`` (the retry policy of the pod's ``PHABMESH_RETRY_FIRST`` and ``..._CAP``), or
    after the endpoint's ``Retry-After`` up to its cap."""
    retries = policy
    failures = 0
    while not stop():
        try:
            credential = fetch()
        except ExchangeError as exc:
            failures += 1
            pause = retries.delay(failures, exc.retry_after)
            log.warning("credential_refresh_failed", error=str(exc), retry_in=round(pause, 1))
            sleep(pause)
            continue
        store(credential)
        failures = 0
        log.info(
            "credential_refreshed",
            expires_at=credential.expires_at.isoformat(),
            binding=credential.binding,
            bot=credential.bot,
            credential_format=credential.format,
        )
        sleep(refresh_delay(credential, now()))
