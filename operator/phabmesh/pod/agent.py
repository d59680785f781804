"""The credential agent: ``phabmesh agent sidecar|init``, the container the webhook adds.

It exchanges the pod's projected service-account token for a credential (the same
exchange as ``phabmesh credential``, :mod:`phabmesh.pod.client`) and writes, into one
directory (``/var/run/phabmesh`` in an injected pod, an emptyDir every app container
mounts, and their ``HOME``):

- ``credential``: the credential and a newline;
- ``.arcrc``: ``{"hosts": {"<gateway>/api/": {"token": ...}}, "config": {"default":
  "<gateway>/"}}``, what arc, phabfive, the phabricator package and canduit read from
  ``~/.arcrc``: the gateway is their Phabricator, with no other configuration.

Each file is written to a temporary file first and renamed into place, mode 0600 (its
owner only: the agent runs as the app's user). A reader sees the old credential or the
new one, never a part.

- ``sidecar``: writes the first credential (the container's startup probe passes once
  the file exists, so the app containers start after it), then replaces it when a third
  of its life is left and at least 30 s before it expires, so the old one is still good
  while a client switches over. Failures are logged with the endpoint's reason and
  retried with backoff (the retry policy of the pod's ``PHABMESH_RETRY_FIRST`` and
  ``PHABMESH_RETRY_CAP``, or the endpoint's ``Retry-After`` up to that cap); SIGTERM ends
  it.
- ``init``: writes one credential and exits 0. When the exchange keeps failing until
  ``--timeout``, or fails for good (the endpoint refused the token itself), it exits 1
  and writes the reason to the termination message (``/dev/termination-log``), which
  ``kubectl describe pod`` shows and which stops the app from starting.

The credential is never logged.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog

from phabmesh import backoff, logs
from phabmesh.backoff import Backoff
from phabmesh.pod import client as podclient

log = structlog.get_logger(__name__)

CREDENTIAL = "credential"
ARCRC = ".arcrc"
TERMINATION_LOG = "/dev/termination-log"


def arcrc(gateway_url: str, token: str) -> str:
    """The ``~/.arcrc`` that makes ``gateway_url`` the Phabricator, with ``token``."""
    base = gateway_url.rstrip("/")
    body = {"hosts": {f"{base}/api/": {"token": token}}, "config": {"default": f"{base}/"}}
    return json.dumps(body, indent=2) + "\n"


class Writer:
    """Writes a credential into ``directory``: the credential file, then the ``.arcrc``."""

    def __init__(self, directory: Path, gateway_url: str) -> None:
        self.directory = directory
        self.gateway_url = gateway_url

    def __call__(self, credential: podclient.Credential) -> None:
        podclient.write_atomically(self.directory / CREDENTIAL, credential.token + "\n")
        if self.gateway_url:
            podclient.write_atomically(
                self.directory / ARCRC, arcrc(self.gateway_url, credential.token)
            )


def _written(credential: podclient.Credential) -> None:
    log.info(
        "credential_written",
        expires_at=credential.expires_at.isoformat(),
        **{
            logs.BINDING: credential.binding,
            logs.BOT: credential.bot,
            logs.CREDENTIAL_FORMAT: credential.format,
        },
    )


def run_init(
    fetch: Callable[[], podclient.Credential],
    store: Callable[[podclient.Credential], None],
    *,
    timeout: float,
    termination_log: Path,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    policy: Backoff = backoff.DEFAULT,
) -> int:
    """One credential, retried (after ``policy``'s pauses, or the endpoint's Retry-After up
    to its cap) until ``timeout``; 0, or 1 with the reason told."""
    deadline = clock() + timeout
    retries = policy
    failures = 0
    while True:
        try:
            credential = fetch()
        except podclient.ExchangeError as exc:
            left = deadline - clock()
            if not exc.retryable or left <= 0:
                reason = f"no credential: {exc}"
                log.error("credential_refused", **{logs.ERROR: str(exc)})
                _tell(termination_log, reason)
                return 1
            failures += 1
            pause = min(retries.delay(failures, exc.retry_after), left)
            log.warning(
                "credential_refresh_failed", retry_in=round(pause, 1), **{logs.ERROR: str(exc)}
            )
            sleep(pause)
            continue
        store(credential)
        _written(credential)
        return 0


def _tell(termination_log: Path, reason: str) -> None:
    """The reason, as the container's termination message (when the file can be written)."""
    try:
        with termination_log.open("w") as handle:
            handle.write(reason[:4000] + "\n")
    except OSError:
        pass


def run_sidecar(
    fetch: Callable[[], podclient.Credential],
    store: Callable[[podclient.Credential], None],
    policy: Backoff = backoff.DEFAULT,
) -> int:
    """Keep a fresh credential written until SIGTERM or SIGINT."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    podclient.watch(fetch, store, policy=policy)  # logs credential_refreshed at each write
    return 0
