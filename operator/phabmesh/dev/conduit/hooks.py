"""Herald webhooks as Phorge's ``HeraldWebhookWorker`` calls them: after an edit, a POST of
the formatted payload to each webhook's URI, signed with its HMAC key, 15 s at most
(:mod:`phabmesh.herald` builds and signs the body)."""

from __future__ import annotations

import dataclasses
import secrets

import aiohttp

from phabmesh import herald

TIMEOUT = 15.0  # HeraldWebhookWorker: ->setTimeout(15)
# What Phorge's HTTPSFuture sends (arcanist's cURL future, as recorded: the cURL version is
# the Phorge host's).
USER_AGENT = "Arcanist/1.0 cURL/7.88.1"


@dataclasses.dataclass(frozen=True)
class Hook:
    """A Herald webhook: its URI and HMAC key, and the Herald rule that calls it."""

    url: str
    key: str
    rule_phid: str = dataclasses.field(default_factory=lambda: f"PHID-HRUL-{secrets.token_hex(10)}")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One call: what was sent, and what came back (status 0: no answer)."""

    url: str
    body: bytes
    headers: dict[str, str]
    status: int
    text: str


def request(
    hook: Hook,
    object_phid: str,
    *,
    epoch: int,
    transactions: tuple[str, ...] = (),
    test: bool = False,
    triggers: tuple[str, ...] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers Phorge sends ``hook`` for an edit of ``object_phid``. An edit's
    triggers are the Herald rules that called the hook (default: the hook's rule); a test
    call's, the user who asked for it."""
    body = herald.payload(
        object_phid,
        epoch=epoch,
        triggers=(hook.rule_phid,) if triggers is None else triggers,
        transactions=transactions,
        test=test,
    )
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": "*/*",
        "Content-Type": "application/json",
        herald.SIGNATURE_HEADER: herald.sign(body, hook.key),
    }
    return body, headers


async def post(url: str, body: bytes, headers: dict[str, str]) -> Delivery:
    """POST ``body`` as Phorge does; the answer, or status 0 when there was none."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                allow_redirects=False,
            ) as answer,
        ):
            return Delivery(url, body, headers, answer.status, await answer.text())
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Delivery(url, body, headers, 0, f"{type(exc).__name__}: {exc}")
