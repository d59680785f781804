"""The test server's accounts and API tokens, and who a token is (Phorge's checks)."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from phabmesh.dev.conduit.api import _ALNUM
from phabmesh.dev.conduit.php import Failure


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


@dataclasses.dataclass
class TestUser:
    id: int
    phid: str
    username: str
    real_name: str
    bot: bool = False
    admin: bool = False
    disabled: bool = False
    email: str = ""
    image_path: str = ""
    date_created: int = 0
    date_modified: int = 0
    edit_policy: str = "admin"
    mailing_list: bool = False
    needs_approval: bool = False

    def roles(self, *, whoami: bool = False) -> list[str]:
        roles = ["disabled"] if self.disabled else []
        if self.bot:
            roles.append("agent" if whoami else "bot")
        if self.admin:
            roles.append("admin")
        roles += ["verified", "approved"]
        if not self.disabled:
            roles.append("activated")
        return roles


@dataclasses.dataclass
class Token:
    user: str
    expires: float | None = None


class Store:
    """Users and tokens, behind one lock (the server's threads and the tests share it)."""

    def __init__(self) -> None:
        self.users: dict[str, TestUser] = {}
        self.tokens: dict[str, Token] = {}
        self.clock: Callable[[], float] = time.time
        self.lock = threading.RLock()

    def add_user(
        self,
        username: str,
        *,
        bot: bool = False,
        admin: bool = False,
        real_name: str | None = None,
        disabled: bool = False,
        phid: str | None = None,
        id: int | None = None,  # noqa: A002 - Phabricator's own field name
        email: str | None = None,
        image_path: str | None = None,
        date_created: int | None = None,
    ) -> TestUser:
        with self.lock:
            created = int(date_created if date_created is not None else self.clock())
            user = TestUser(
                id=id
                if id is not None
                else max((u.id for u in self.users.values()), default=0) + 1,
                phid=phid or f"PHID-USER-{_random(20)}",
                username=username,
                real_name=real_name if real_name is not None else username,
                bot=bot,
                admin=admin,
                disabled=disabled,
                email=email or f"{username}@example.com",
                image_path=image_path
                or f"/file/data/{_random(20)}/PHID-FILE-{_random(20)}/profile.png",
                date_created=created,
                date_modified=created,
                edit_policy="no-one" if admin else "admin",
            )
            self.users[username] = user
            return user

    def add_token(
        self, username: str, token: str | None = None, expires: float | None = None
    ) -> str:
        with self.lock:
            if username not in self.users:
                raise KeyError(username)
            token = token or f"api-{_random(28)}"
            self.tokens[token] = Token(username, expires)
            return token

    def disable_user(self, username: str) -> None:
        self._set_disabled(username, True)

    def enable_user(self, username: str) -> None:
        self._set_disabled(username, False)

    def _set_disabled(self, username: str, disabled: bool) -> None:
        with self.lock:
            user = self.users[username]
            user.disabled = disabled
            user.date_modified = int(self.clock())

    def terminate_token(self, token: str) -> None:
        """What the web UI's "terminate" does: the expiry moves into the past."""
        with self.lock:
            self.tokens[token].expires = self.clock() - 60

    def delete_token(self, token: str) -> None:
        """What ``bin/auth revoke --type conduit`` does: the token is gone."""
        with self.lock:
            self.tokens.pop(token, None)

    def authenticate(self, token: str | None) -> TestUser:
        if not token:
            raise Failure("ERR-INVALID-SESSION", "Session key is not present.")
        if len(token.encode()) != 32:  # PHP's strlen: bytes
            raise Failure(
                "ERR-INVALID-AUTH",
                f'API token "{token}" has the wrong length. API tokens should be 32 '
                "characters long.",
            )
        if token.split("-", 1)[0] not in ("api", "cli", "clr") or token[3] != "-":
            raise Failure(
                "ERR-INVALID-AUTH",
                f'API token "{token}" has the wrong format. API tokens should be 32 characters '
                "long and begin with one of these prefixes: api, cli, clr.",
            )
        entry = self.tokens.get(token)
        if entry is None or entry.user not in self.users:
            raise Failure("ERR-INVALID-AUTH", f'API token "{token}" is not valid.')
        if entry.expires is not None and entry.expires <= self.clock():
            raise Failure(
                "ERR-INVALID-AUTH", f'API token "{token}" was previously valid, but has expired.'
            )
        user = self.users[entry.user]
        if user.disabled:
            raise Failure("ERR-INVALID-AUTH", "User account is not permitted to use the API.")
        return user

    def find(self, identifier: Any) -> TestUser | None:
        for user in self.users.values():
            if identifier in (user.phid, user.username, str(user.id), user.id):
                return user
        return None

    def visible(self, query_key: Any) -> list[TestUser]:
        users = sorted(self.users.values(), key=lambda u: -u.id)  # newest first
        if query_key == "active":
            users = [u for u in users if not u.disabled]
        return users
