"""PhabricatorBot checks: is the token in the Secret really this bot's, and is it usable?

Gather (the Secret's token, ``user.whoami``, ``user.search``), decide (pure
:func:`judge`), and the handler layer writes the ``Ready`` condition.
"""

from __future__ import annotations

import dataclasses
import datetime

from phabmesh import conduit

# Ready condition reasons for a PhabricatorBot.
VERIFIED = "Verified"  # the token belongs to this username, a bot, not disabled
SECRET_MISSING = "SecretMissing"  # tokenSecretRef names no Secret in the operator's namespace
SECRET_KEY_MISSING = "SecretKeyMissing"  # the Secret has no (or an empty) tokenSecretRef.key
TOKEN_INVALID = "TokenInvalid"  # Phabricator refused the token (unknown, expired, revoked)
USERNAME_MISMATCH = "UsernameMismatch"  # the token belongs to another user
NOT_A_BOT = "NotABot"  # the account is a human account, not a bot
DISABLED = "Disabled"  # the bot account is disabled
UNAVAILABLE = "PhabricatorUnavailable"  # Phabricator could not be reached (status Unknown)
INVALID_SPEC = "InvalidSpec"  # the spec could not be read


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result of one check: the Ready condition's status, reason and message."""

    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str
    phid: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "True"


def check(client: conduit.ConduitClient, username: str, token: str | None) -> Outcome:
    """Ask Phabricator about ``token`` (blocking: run it in a thread)."""
    if not token:
        return Outcome("False", SECRET_KEY_MISSING, "the token Secret holds no token")
    try:
        me = client.whoami(token)
        if me.username != username:
            return Outcome(
                "False",
                USERNAME_MISMATCH,
                f'the token belongs to "{me.username}", not to "{username}"',
            )
        found = [u for u in client.user_search(token, {"phids": [me.phid]}) if u.phid == me.phid]
    except conduit.InvalidAuth as exc:
        if "not permitted" in str(exc):
            return Outcome("False", DISABLED, f'the account "{username}" is disabled')
        return Outcome("False", TOKEN_INVALID, "Phabricator does not accept the token")
    except conduit.InvalidSession:
        return Outcome("False", TOKEN_INVALID, "the token is empty")
    except conduit.PhabricatorUnavailable as exc:
        return Outcome("Unknown", UNAVAILABLE, f"Phabricator is unavailable: {exc}")
    except conduit.ConduitError as exc:
        return Outcome("False", TOKEN_INVALID, f"Phabricator refused the check: {exc}")
    if not found:
        return Outcome("False", TOKEN_INVALID, f'user.search does not show "{username}"')
    user = found[0]
    if user.is_disabled:
        return Outcome("False", DISABLED, f'the account "{username}" is disabled', me.phid)
    if not user.is_bot:
        return Outcome("False", NOT_A_BOT, f'"{username}" is a human account, not a bot', me.phid)
    return Outcome("True", VERIFIED, f'the token belongs to bot "{username}"', me.phid)


@dataclasses.dataclass
class Schedule:
    """When a bot is next due for a check (in memory, per bot)."""

    last_at: datetime.datetime | None = None
    generation: int = -1
    secret_version: str | None = None
    failures: int = 0

    def due(
        self,
        now: datetime.datetime,
        generation: int,
        secret_version: str | None,
        interval: datetime.timedelta,
    ) -> bool:
        if self.last_at is None or generation != self.generation:
            return True
        if secret_version != self.secret_version:
            return True
        wait = interval
        if self.failures:
            # Back off on unavailability: 5 s, 10 s, 20 s... up to the interval.
            wait = min(interval, datetime.timedelta(seconds=5 * 2 ** (self.failures - 1)))
        return now - self.last_at >= wait

    def record(
        self,
        now: datetime.datetime,
        generation: int,
        secret_version: str | None,
        outcome: Outcome,
    ) -> None:
        self.last_at = now
        self.generation = generation
        self.secret_version = secret_version
        self.failures = self.failures + 1 if outcome.reason == UNAVAILABLE else 0
