"""The Conduit test server: state, checks and methods (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import re
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from phabmesh import serving
from phabmesh.conduit import responses, wire

_ALNUM = string.ascii_lowercase + string.digits
PUBLIC_METHODS = frozenset({"conduit.ping", "conduit.getcapabilities"})
PARAMS: dict[str, frozenset[str]] = {
    "conduit.ping": frozenset(),
    "conduit.getcapabilities": frozenset(),
    "conduit.query": frozenset(),
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
ATTACHMENTS = frozenset({"availability"})
# Three-state constraints and the account flag each one filters on.
THREE_STATE = (
    ("isAdmin", "admin"),
    ("isDisabled", "disabled"),
    ("isBot", "bot"),
    ("isMailingList", "mailing_list"),
    ("needsApproval", "needs_approval"),
)
CAPABILITIES = {
    "authentication": ["token", "asymmetric", "session", "sessionless"],
    "signatures": ["consign"],
    "input": ["json", "urlencoded"],
    "output": ["json", "human"],
}
# conduit.query: stock Phorge's own description of each method this server has (Phorge lists
# all of its methods). Clients such as phabfive read it before their first call.
_SEARCH_DOCS = (
    "This is a standard **ApplicationSearch** method which will let you list, query, or search "
    "for objects. For documentation on these endpoints, see **[[ https://we.phorge.it/diviner/"
    "find/?name=Conduit%20API%3A%20Using%20Search%20Endpoints&type=article&jump=1 | Conduit API: "
    "Using Search Endpoints ]]**."
)
_EDIT_DOCS = (
    "This is a standard **ApplicationEditor** method which allows you to create and modify "
    "objects by applying transactions. For documentation on these endpoints, see **[[ "
    "https://we.phorge.it/diviner/find/?name=Conduit%20API%3A%20Using%20Edit%20Endpoints&type="
    "article&jump=1 | Conduit API: Using Edit Endpoints ]]**."
)
METHODS: dict[str, dict[str, Any]] = {
    "conduit.getcapabilities": {
        "description": "List capabilities, wire formats, and authentication protocols available "
        "on this server.",
        "params": [],
        "return": "dict<string, any>",
    },
    "conduit.ping": {
        "description": "Basic ping for monitoring or a health-check.",
        "params": [],
        "return": "string",
    },
    "conduit.query": {
        "description": "Returns the parameters of the Conduit methods.",
        "params": [],
        "return": "dict<dict>",
    },
    "user.disable": {
        "description": "Permanently disable specified users (admin only).",
        "params": {"phids": "required list<phid>"},
        "return": "void",
    },
    "user.edit": {
        "description": _EDIT_DOCS,
        "params": {
            "transactions": "list<map<string, wild>>",
            "objectIdentifier": "optional id|phid|string",
        },
        "return": "map<string, wild>",
    },
    "user.enable": {
        "description": "Re-enable specified users (admin only).",
        "params": {"phids": "required list<phid>"},
        "return": "void",
    },
    "user.search": {
        "description": _SEARCH_DOCS,
        "params": {
            "queryKey": "optional string",
            "constraints": "optional map<string, wild>",
            "attachments": "optional map<string, bool>",
            "order": "optional order",
            "before": "optional string",
            "after": "optional string",
            "limit": "optional int (default = 100)",
        },
        "return": "map<string, wild>",
    },
    "user.whoami": {
        "description": "Retrieve information about the logged-in user.",
        "params": [],
        "return": "nonempty dict<string, wild>",
    },
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


RATE_LIMITED_TEXT = (
    'TOO MANY REQUESTS\nYou ("{client}") are issuing too many requests too quickly.\n'
)
# Headers Phorge sends on every page, Conduit answers and fatal pages alike.
COMMON_HEADERS = {
    "X-Frame-Options": "Deny",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Expires": "Sat, 01 Jan 2000 00:00:00 GMT",
    "X-Content-Type-Options": "nosniff",
}
METHOD_NAME_BYTES = 64


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
class _Token:
    user: str
    expires: float | None = None


class _Failure(Exception):
    def __init__(self, code: str, info: str) -> None:
        super().__init__(info)
        self.code = code
        self.info = info


_BOOL_STRINGS = {"0": False, "1": True, "false": False, "true": True}


def _invalid(key: str, message: str) -> _Failure:
    """Phorge's parameter types raise a plain exception, which Conduit reports as CORE."""
    return _Failure("ERR-CONDUIT-CORE", f'Error while reading "{key}": {message}')


def _read_bool(key: str, value: Any, strict: bool) -> bool:
    """``ConduitBoolParameterType``: "true"/"1"/"false"/"0" only from form fields."""
    if not strict and isinstance(value, str) and value.lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.lower()]
    if isinstance(value, bool):
        return value
    raise _invalid(key, "Expected boolean (true or false), got something else.")


def _read_int(key: str, value: Any, strict: bool) -> int:
    if not strict and isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _invalid(key, "Expected integer, got something else.")


def _read_string(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _invalid(key, "Expected string, got something else.")


def _read_list(key: str, value: Any, *, allow_empty: bool = True) -> list[Any]:
    """``ConduitListParameterType``: a PHP array with keys 0..n-1."""
    if isinstance(value, dict):
        if list(value) != [str(i) for i in range(len(value))]:
            raise _invalid(key, "Expected a list, but value is an object.")
        value = list(value.values())
    if not isinstance(value, list):
        raise _invalid(key, "Expected a list, but value is not a list.")
    if not value and not allow_empty:
        raise _invalid(key, "Expected a nonempty list, but value is an empty list.")
    return value


def _php_lt(value: Any, number: int) -> bool:
    """PHP 8's ``$value < $number``: numeric strings compare as numbers, others as strings."""
    numeric = _php_number(value)
    if numeric is not None:
        return numeric < number
    return _php_string(value) < str(number)


def _php_gt(value: Any, number: int) -> bool:
    numeric = _php_number(value)
    if numeric is not None:
        return numeric > number
    return _php_string(value) > str(number)


def _php_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else None
        except ValueError:
            return None
    return None


def _php_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return "Array"
    return "" if value is None else str(value)


def _php_intval(value: Any) -> int:
    """``(int)$value``: leading digits of a string, 0 when there are none."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int(value)
    match = re.match(r"\s*([+-]?\d+)", value) if isinstance(value, str) else None
    return int(match.group(1)) if match else 0


class ConduitServer:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, hostname: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname or socket.gethostname()
        self.users: dict[str, TestUser] = {}
        self.tokens: dict[str, _Token] = {}
        self.down = False  # every request answers 500 with Phorge's fatal page
        self.fail_next = 0  # the next N requests answer ``fail_status``, then all is well
        self.fail_status = 500
        self.rate_limited = False  # every request answers 429, as Phorge's rate limiter
        self.delay = 0.0  # seconds to wait before answering
        # As a proxy in front of Phorge that compresses every answer with this coding,
        # whatever the client's Accept-Encoding says (None: Phorge's own choice).
        self.compress_anyway: responses.Coding | None = None
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

    @staticmethod
    def _reply(result: Any = None, code: str | None = None, info: str | None = None) -> bytes:
        return responses.envelope(result, code, info)

    def _encode(self, request: web.Request, body: bytes) -> web.Response:
        """A Conduit answer compressed as Phorge compresses it (errors too)."""
        if self.compress_anyway is not None:
            encoded = responses.Encoded(
                responses.compress(body, self.compress_anyway), self.compress_anyway
            )
        else:
            encoded = responses.encode(body, request.headers.get("Accept-Encoding"))
        return web.Response(
            body=encoded.body,
            headers={
                "X-Conduit-Capabilities": "gzip",
                "Content-Type": "application/json",
                **COMMON_HEADERS,
                **encoded.headers,
            },
        )

    def _fault(self, request: web.Request) -> web.Response | None:
        """A broken or rate-limited server, as Phorge's startup code answers before Conduit.

        These pages are written before ``AphrontResponse`` turns compression on: never
        compressed.
        """
        with self._lock:
            if self.down:
                status = 500
            elif self.fail_next:
                self.fail_next -= 1
                status = self.fail_status
            elif self.rate_limited:
                status = 429
            else:
                return None
        if status == 429:
            return web.Response(
                status=429,
                text=RATE_LIMITED_TEXT.format(client=request.remote or "127.0.0.1"),
                content_type="text/plain",
                charset="utf-8",
            )
        return web.Response(
            status=status,
            text=DB_DOWN_PAGE,
            content_type="text/html",
            charset="UTF-8",
            headers=COMMON_HEADERS,
        )

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        with self._lock:
            self.calls[method] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self._fault(request)
        if fault is not None:
            return fault
        return self._encode(request, await self._call(request, method))

    async def _call(self, request: web.Request, method: str) -> bytes:
        """Phorge's order: read params, find the method, check its params, authenticate, run."""
        body = await request.read()
        # Phorge truncates the name to its call log's 64-byte column before anything else.
        method = method.encode()[:METHOD_NAME_BYTES].decode(errors="ignore")
        try:
            call = serving.decode_conduit(request, body, 8 << 20)
        except wire.BadRequest as exc:
            return self._reply(None, "ERR-CONDUIT-CORE", exc.info(method))
        if method not in PARAMS:
            return self._reply(
                None, "ERR-CONDUIT-CALL", f'Conduit API method "{method}" does not exist.'
            )
        unknown = [key for key in call.params if key not in PARAMS[method]]
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
                result = self._execute(method, call, user, str(request.url.origin()))
        except _Failure as failure:
            return self._reply(None, failure.code, failure.info)
        return self._reply(result)

    def _authenticate(self, token: str | None) -> TestUser:
        if not token:
            raise _Failure("ERR-INVALID-SESSION", "Session key is not present.")
        if len(token.encode()) != 32:  # PHP's strlen: bytes
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

    def _execute(self, method: str, call: wire.Call, user: TestUser | None, base: str) -> Any:
        if method == "conduit.ping":
            return self.hostname
        if method == "conduit.getcapabilities":
            return CAPABILITIES
        assert user is not None
        if method == "conduit.query":
            return METHODS
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
            return self._search(call.params, user, strict=call.strict)
        if method == "user.edit":
            return self._edit(call.params, user, strict=call.strict)
        return self._toggle(call.params, user, disabled=method == "user.disable")

    def _search(self, params: dict[str, Any], viewer: TestUser, *, strict: bool) -> Any:
        """``PhabricatorApplicationSearchEngine::buildConduitResponse``, checks in its order."""
        query_key = params.get("queryKey")
        if query_key is not None and query_key != "" and query_key not in QUERY_KEYS:
            raise _Failure("ERR-BAD-QUERYKEY", 'Invalid query for parameter "queryKey".')
        constraints = params.get("constraints")
        if constraints is None:
            constraints = {}
        if not isinstance(constraints, dict | list):
            raise _Failure(
                "ERR-INVALID-CONSTRAINTS-FORMAT",
                'Parameter "constraints" must be a map of constraints.',
            )
        if isinstance(constraints, list):  # a PHP array all the same
            constraints = {str(i): v for i, v in enumerate(constraints)}
        allowed = CONSTRAINTS | ({"mfa"} if viewer.admin else set())
        if set(constraints) - allowed:
            raise _Failure(
                "ERR-INVALID-CONSTRAINT", 'Parameter "constraints" includes an invalid key.'
            )
        users = self._filter(self._visible(query_key), constraints, strict)
        attachments = params.get("attachments")
        if attachments is None:
            attachments = {}
        if not isinstance(attachments, dict | list):
            raise _Failure(
                "ERR-INVALID-ATTACHMENTS-FORMAT",
                'Parameter "attachments" must be a map of attachments.',
            )
        if isinstance(attachments, list):
            attachments = {str(i): v for i, v in enumerate(attachments)}
        if set(attachments) - ATTACHMENTS:
            raise _Failure(
                "ERR-INVALID-ATTACHMENT", 'Parameter "attachments" includes an invalid key.'
            )
        limit_raw = params.get("limit")
        limit = self._limit(limit_raw)
        page, after_id, before_id = self._page(users, limit, params)
        return {
            "data": [self._user_record(u, attachments) for u in page],
            "maps": {},
            "query": {"queryKey": query_key if query_key else None},
            "cursor": {
                # AphrontCursorPagerView::setPageSize() stores max(1, $limit): PHP's max()
                # returns the first of equal values, so a limit of "1" comes back as 1.
                "limit": 100 if limit_raw is None else (1 if limit == 1 else limit_raw),
                "after": after_id,
                "before": before_id,
                "order": params.get("order"),
            },
        }

    def _visible(self, query_key: Any) -> list[TestUser]:
        users = sorted(self.users.values(), key=lambda u: -u.id)  # newest first
        if query_key == "active":
            users = [u for u in users if not u.disabled]
        return users

    @staticmethod
    def _filter(users: list[TestUser], constraints: dict[str, Any], strict: bool) -> list[TestUser]:
        """Read each constraint with its Conduit type (in field order), then filter."""
        if "usernames" in constraints:
            names = {
                _read_string(f"usernames[{i}]", v)
                for i, v in enumerate(_read_list("usernames", constraints["usernames"]))
            }
            users = [u for u in users if u.username in names]
        if "nameLike" in constraints:
            needle = _read_string("nameLike", constraints["nameLike"]).lower()
            # PhabricatorPeopleQuery: username LIKE %x% OR realname LIKE %x%, case-insensitive.
            users = [
                u for u in users if needle in u.username.lower() or needle in u.real_name.lower()
            ]
        for name, attr in THREE_STATE:
            if name in constraints:
                flag = _read_bool(name, constraints[name], strict)
                users = [u for u in users if getattr(u, attr) is flag]
        if "mfa" in constraints and _read_bool("mfa", constraints["mfa"], strict):
            users = []  # nobody here has enrolled in MFA
        for name, newer in (("createdStart", True), ("createdEnd", False)):
            if name in constraints:
                epoch = _read_int(name, constraints[name], strict)
                if epoch <= 0:
                    raise _invalid(name, f"Epoch timestamp must be larger than 0, got {epoch}.")
                users = [
                    u
                    for u in users
                    if (u.date_created >= epoch if newer else u.date_created <= epoch)
                ]
        if "ids" in constraints:
            ids = {
                _read_int(f"ids[{i}]", v, strict)
                for i, v in enumerate(_read_list("ids", constraints["ids"], allow_empty=False))
            }
            users = [u for u in users if u.id in ids]
        if "phids" in constraints:
            phids = {
                _read_string(f"phids[{i}]", v)
                for i, v in enumerate(_read_list("phids", constraints["phids"], allow_empty=False))
            }
            users = [u for u in users if u.phid in phids]
        if "query" in constraints:
            words = _read_string("query", constraints["query"]).lower().split()
            users = [
                u for u in users if all(w in f"{u.username} {u.real_name}".lower() for w in words)
            ]
        return users

    @staticmethod
    def _page(
        users: list[TestUser], limit: int, params: dict[str, Any]
    ) -> tuple[list[TestUser], str | None, str | None]:
        """A cursor page of ``users`` (newest first) and the cursors Phorge would give."""
        after, before = params.get("after"), params.get("before")
        if before is not None:
            window = [u for u in users if u.id > _php_intval(before)]
            page = window[-limit:]
        else:
            window = [u for u in users if after is None or u.id < _php_intval(after)]
            page = window[:limit]
        more_after = bool(page) and any(u.id < page[-1].id for u in users)
        more_before = (
            bool(page)
            and (after is not None or before is not None)
            and any(u.id > page[0].id for u in users)
        )
        return (
            page,
            str(page[-1].id) if more_after else None,
            str(page[0].id) if more_before else None,
        )

    @staticmethod
    def _limit(raw: Any) -> int:
        """``setPagerLimitForConduit``, comparing the raw value as PHP 8 does."""
        if raw is None:
            return 100
        if _php_gt(raw, 100):
            raise _Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Maximum page size for Conduit API method calls is 100, but this call "
                f"specified {_php_string(raw)}.",
            )
        if _php_lt(raw, 1):
            raise _Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Minimum page size for Conduit API method calls is 1, but this call "
                f"specified {_php_string(raw)}.",
            )
        return max(1, min(100, _php_intval(raw)))

    @staticmethod
    def _user_record(user: TestUser, attachments: Any) -> dict[str, Any]:
        attached: dict[str, Any] = {}
        # Phorge attaches every key named, whatever its value (even false).
        if "availability" in attachments:
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

    def _edit(self, params: dict[str, Any], viewer: TestUser, *, strict: bool) -> Any:
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
        for xact in _read_list("transactions", params.get("transactions") or []):
            if not isinstance(xact, dict) or xact.get("type") != "disabled":
                raise _Failure("ERR-CONDUIT-CORE", "Unsupported transaction type.")
            if not viewer.admin:
                raise _Failure(
                    "ERR-CONDUIT-CORE",
                    "[You Shall Not Pass: People] (Can Disable Users) You do not have permission "
                    "to disable or enable users. // Administrators can take this action.",
                )
            user.disabled = _read_bool("value", xact.get("value"), strict)
            user.date_modified = int(self.clock())
            xacts.append({"phid": f"PHID-XACT-USER-{_random(15)}"})
        return {"object": {"id": user.id, "phid": user.phid}, "transactions": xacts}

    def _toggle(self, params: dict[str, Any], viewer: TestUser, *, disabled: bool) -> Any:
        if not viewer.admin:
            raise _Failure("ERR-PERMISSIONS", "Only admins can call this method.")
        for phid in _read_list("phids", params.get("phids") or []):
            user = self._find(phid)
            if user is not None:
                user.disabled = disabled
                user.date_modified = int(self.clock())
        return True
