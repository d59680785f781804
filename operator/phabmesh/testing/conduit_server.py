"""The Conduit test server: state, checks and methods (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from phabmesh.conduit import wire

_ALNUM = string.ascii_lowercase + string.digits
PUBLIC_METHODS = frozenset({"conduit.ping", "conduit.getcapabilities"})
PARAMS: dict[str, frozenset[str]] = {
    "conduit.ping": frozenset(),
    "conduit.getcapabilities": frozenset(),
    "user.whoami": frozenset(),
    "user.search": frozenset(
        {"queryKey", "constraints", "attachments", "order", "before", "after", "limit"}
    ),
    "user.edit": frozenset({"transactions", "objectIdentifier"}),
    "user.disable": frozenset({"phids"}),
    "user.enable": frozenset({"phids"}),
}
CONSTRAINTS = frozenset(
    {
        "ids",
        "phids",
        "usernames",
        "nameLike",
        "isAdmin",
        "isDisabled",
        "isBot",
        "isMailingList",
        "needsApproval",
        "createdStart",
        "createdEnd",
        "query",
    }
)
QUERY_KEYS = frozenset({"all", "active"})
CAPABILITIES = {
    "authentication": ["token", "asymmetric", "session", "sessionless"],
    "signatures": ["consign"],
    "input": ["json", "urlencoded"],
    "output": ["json", "human"],
}
DB_DOWN_PAGE = """<!DOCTYPE html>
<html>
  <head>
    <meta charset="UTF-8" />
    <title>Setup Error</title>
  </head>
  <body class="setup-fatal in-flight"><div class="in-flight-error-detail"><h1 class="in-flight-error-title">A Troublesome Encounter!</h1><div class="in-flight-error-body">Woe! This request had its journey cut short by unexpected circumstances (Can Not Connect to MySQL).</div></div></body>
</html>
"""  # noqa: E501 - a page, as Phorge sends it


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
class _Token:
    user: str
    expires: float | None = None


class _Failure(Exception):
    def __init__(self, code: str, info: str) -> None:
        super().__init__(info)
        self.code = code
        self.info = info


def _php_json(value: Any) -> bytes:
    """JSON as PHP's json_encode writes it (slashes escaped)."""
    return json.dumps(value, separators=(",", ":")).replace("/", "\\/").encode()


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _Failure(
        "ERR-CONDUIT-CORE",
        f'Error while reading "{name}": Expected boolean (true or false), got something else.',
    )


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    raise _Failure(
        "ERR-CONDUIT-CORE",
        f'Error while reading "{name}": Expected a list, but value is not a list.',
    )


class ConduitServer:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, hostname: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname or socket.gethostname()
        self.users: dict[str, TestUser] = {}
        self.tokens: dict[str, _Token] = {}
        self.down = False
        self.delay = 0.0
        self.calls: collections.Counter[str] = collections.Counter()
        self.clock: Callable[[], float] = time.time
        self._lock = threading.RLock()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- driving it from tests ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        with self._lock:
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
        with self._lock:
            if username not in self.users:
                raise KeyError(username)
            token = token or f"api-{_random(28)}"
            self.tokens[token] = _Token(username, expires)
            return token

    def disable_user(self, username: str) -> None:
        self._set_disabled(username, True)

    def enable_user(self, username: str) -> None:
        self._set_disabled(username, False)

    def _set_disabled(self, username: str, disabled: bool) -> None:
        with self._lock:
            user = self.users[username]
            user.disabled = disabled
            user.date_modified = int(self.clock())

    def terminate_token(self, token: str) -> None:
        """What the web UI's "terminate" does: the expiry moves into the past."""
        with self._lock:
            self.tokens[token].expires = self.clock() - 60

    def delete_token(self, token: str) -> None:
        """What ``bin/auth revoke --type conduit`` does: the token is gone."""
        with self._lock:
            self.tokens.pop(token, None)

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/api/{method}", self._handle)
        return app

    async def start_async(self) -> None:
        # Bodies are decompressed by wire.decompress, which bounds their size.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ConduitServer:
        await self.start_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()

    def start(self) -> ConduitServer:
        """Serve from a background thread with its own event loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conduit-test-server", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start_async(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    # -- the server -----------------------------------------------------------------------

    def _reply(
        self, result: Any = None, code: str | None = None, info: str | None = None
    ) -> web.Response:
        body = _php_json({"result": result, "error_code": code, "error_info": info})
        return web.Response(
            body=body,
            headers={
                "Content-Type": "application/json",
                "X-Conduit-Capabilities": "gzip",
                "Cache-Control": "no-store",
                "Expires": "Sat, 01 Jan 2000 00:00:00 GMT",
            },
        )

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        self.calls[method] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return web.Response(
                status=500, text=DB_DOWN_PAGE, content_type="text/html", charset="UTF-8"
            )
        if method not in PARAMS:
            return self._reply(
                None, "ERR-CONDUIT-CALL", f'Conduit API method "{method}" does not exist.'
            )
        body = await request.read()
        try:
            call = wire.decode_request(
                request.method,
                request.headers.get("Content-Type", ""),
                body,
                request.query_string,
                content_encoding=request.headers.get("Content-Encoding", ""),
                max_bytes=8 << 20,
            )
        except wire.BadRequest as exc:
            return self._reply(None, "ERR-CONDUIT-CORE", exc.info(method))
        unknown = sorted(set(call.params) - PARAMS[method])
        if unknown:
            listed = "'" + "', '".join(unknown) + "'"
            return self._reply(
                None,
                "ERR-CONDUIT-CALL",
                f'API Method "{method}" does not define these parameters: {listed}.',
            )
        try:
            with self._lock:
                user = None if method in PUBLIC_METHODS else self._authenticate(call.token)
                result = self._execute(method, call.params, user, str(request.url.origin()))
        except _Failure as failure:
            return self._reply(None, failure.code, failure.info)
        return self._reply(result)

    def _authenticate(self, token: str | None) -> TestUser:
        if not token:
            raise _Failure("ERR-INVALID-SESSION", "Session key is not present.")
        if len(token) != 32:
            raise _Failure(
                "ERR-INVALID-AUTH",
                f'API token "{token}" has the wrong length. API tokens should be 32 '
                "characters long.",
            )
        if token.split("-", 1)[0] not in ("api", "cli", "clr") or token[3] != "-":
            raise _Failure(
                "ERR-INVALID-AUTH",
                f'API token "{token}" has the wrong format. API tokens should be 32 characters '
                "long and begin with one of these prefixes: api, cli, clr.",
            )
        entry = self.tokens.get(token)
        if entry is None or entry.user not in self.users:
            raise _Failure("ERR-INVALID-AUTH", f'API token "{token}" is not valid.')
        if entry.expires is not None and entry.expires <= self.clock():
            raise _Failure(
                "ERR-INVALID-AUTH", f'API token "{token}" was previously valid, but has expired.'
            )
        user = self.users[entry.user]
        if user.disabled:
            raise _Failure("ERR-INVALID-AUTH", "User account is not permitted to use the API.")
        return user

    def _execute(
        self, method: str, params: dict[str, Any], user: TestUser | None, base: str
    ) -> Any:
        if method == "conduit.ping":
            return self.hostname
        if method == "conduit.getcapabilities":
            return CAPABILITIES
        assert user is not None
        if method == "user.whoami":
            return {
                "phid": user.phid,
                "userName": user.username,
                "realName": user.real_name,
                "image": base + user.image_path,
                "uri": f"{base}/p/{user.username}/",
                "roles": user.roles(whoami=True),
                "primaryEmail": user.email,
            }
        if method == "user.search":
            return self._search(params, user)
        if method == "user.edit":
            return self._edit(params, user)
        return self._toggle(params, user, disabled=method == "user.disable")

    def _search(self, params: dict[str, Any], viewer: TestUser) -> Any:
        query_key = params.get("queryKey")
        if query_key is not None and query_key not in QUERY_KEYS:
            raise _Failure("ERR-BAD-QUERYKEY", 'Invalid query for parameter "queryKey".')
        constraints = params.get("constraints") or {}
        if not isinstance(constraints, dict):
            raise _Failure("ERR-CONDUIT-CORE", 'Parameter "constraints" must be a map.')
        allowed = CONSTRAINTS | ({"mfa"} if viewer.admin else set())
        if set(constraints) - allowed:
            raise _Failure(
                "ERR-INVALID-CONSTRAINT", 'Parameter "constraints" includes an invalid key.'
            )
        users = sorted(self.users.values(), key=lambda u: -u.id)
        if query_key == "active":
            users = [u for u in users if not u.disabled]
        for name in ("ids", "phids", "usernames"):
            if name in constraints:
                wanted = {str(v) for v in _as_list(name, constraints[name])}
                field = {"ids": "id", "phids": "phid", "usernames": "username"}[name]
                users = [u for u in users if str(getattr(u, field)) in wanted]
        for name, attr in (("isBot", "bot"), ("isDisabled", "disabled"), ("isAdmin", "admin")):
            if name in constraints:
                flag = _as_bool(name, constraints[name])
                users = [u for u in users if getattr(u, attr) is flag]
        if "mfa" in constraints and _as_bool("mfa", constraints["mfa"]):
            users = []  # nobody here has enrolled in MFA
        if "nameLike" in constraints:
            needle = str(constraints["nameLike"]).lower()
            users = [u for u in users if needle in u.username.lower()]
        limit_raw = params.get("limit")
        limit = self._limit(limit_raw)
        after, before = params.get("after"), params.get("before")
        if before is not None:
            window = [u for u in users if u.id > int(before)]
            page = list(reversed(list(reversed(window))[:limit]))
        else:
            window = [u for u in users if after is None or u.id < int(after)]
            page = window[:limit]
        more_after = bool(page) and any(u.id < page[-1].id for u in users)
        more_before = (
            bool(page)
            and (after is not None or before is not None)
            and any(u.id > page[0].id for u in users)
        )
        attachments = params.get("attachments") or {}
        data = [self._user_record(u, attachments) for u in page]
        echo: Any = 100 if not limit_raw else (1 if limit == 1 else limit_raw)
        return {
            "data": data,
            "maps": {},
            "query": {"queryKey": query_key},
            "cursor": {
                "limit": echo,
                "after": str(page[-1].id) if more_after else None,
                "before": str(page[0].id) if more_before else None,
                "order": None,
            },
        }

    @staticmethod
    def _limit(raw: Any) -> int:
        if not raw:
            if raw is None or raw == "":
                return 100
            raise _Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Minimum page size for Conduit API method calls is 1, but this call "
                f"specified {raw}.",
            )
        try:
            limit = int(raw)
        except (TypeError, ValueError) as exc:
            raise _Failure("ERR-CONDUIT-CORE", 'Parameter "limit" must be an integer.') from exc
        if limit < 1:
            raise _Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Minimum page size for Conduit API method calls is 1, but this call "
                f"specified {raw}.",
            )
        if limit > 100:
            raise _Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Maximum page size for Conduit API method calls is 100, but this call "
                f"specified {raw}.",
            )
        return limit

    @staticmethod
    def _user_record(user: TestUser, attachments: Any) -> dict[str, Any]:
        attached: dict[str, Any] = {}
        if isinstance(attachments, dict) and attachments.get("availability") not in (
            None,
            False,
            "false",
            "0",
            "",
        ):
            attached["availability"] = {
                "value": "available",
                "until": None,
                "name": "Available",
                "color": "green",
                "eventPHID": None,
            }
        return {
            "id": user.id,
            "type": "USER",
            "phid": user.phid,
            "fields": {
                "username": user.username,
                "realName": user.real_name,
                "roles": user.roles(),
                "dateCreated": user.date_created,
                "dateModified": user.date_modified,
                "policy": {"view": "public", "edit": user.edit_policy},
            },
            "attachments": attached,
        }

    def _find(self, identifier: Any) -> TestUser | None:
        for user in self.users.values():
            if identifier in (user.phid, user.username, str(user.id), user.id):
                return user
        return None

    def _edit(self, params: dict[str, Any], viewer: TestUser) -> Any:
        target = params.get("objectIdentifier")
        if target is None:
            raise _Failure(
                "ERR-CONDUIT-CORE",
                "[You Shall Not Pass: PhabricatorUserEditEngine] (Can Edit) You do not have "
                "permission to edit this object. // By default, no one can take this action.",
            )
        user = self._find(target)
        if user is None:
            raise _Failure("ERR-CONDUIT-CORE", f'No object exists with ID "{target}".')
        xacts = []
        for xact in _as_list("transactions", params.get("transactions") or []):
            if not isinstance(xact, dict) or xact.get("type") != "disabled":
                raise _Failure("ERR-CONDUIT-CORE", "Unsupported transaction type.")
            if not viewer.admin:
                raise _Failure(
                    "ERR-CONDUIT-CORE",
                    "[You Shall Not Pass: People] (Can Disable Users) You do not have permission "
                    "to disable or enable users. // Administrators can take this action.",
                )
            user.disabled = _as_bool("value", xact.get("value"))
            user.date_modified = int(self.clock())
            xacts.append({"phid": f"PHID-XACT-USER-{_random(15)}"})
        return {"object": {"id": user.id, "phid": user.phid}, "transactions": xacts}

    def _toggle(self, params: dict[str, Any], viewer: TestUser, *, disabled: bool) -> Any:
        if not viewer.admin:
            raise _Failure("ERR-PERMISSIONS", "Only admins can call this method.")
        for phid in _as_list("phids", params.get("phids") or []):
            user = self._find(phid)
            if user is not None:
                user.disabled = disabled
                user.date_modified = int(self.clock())
        return True
