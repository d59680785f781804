"""The Conduit methods the test server answers, each with Phorge's checks in Phorge's order."""

from __future__ import annotations

from typing import Any

from phabmesh.conduit import wire
from phabmesh.dev.conduit import php
from phabmesh.dev.conduit.api import (
    ATTACHMENTS,
    CAPABILITIES,
    CONSTRAINTS,
    METHODS,
    QUERY_KEYS,
    THREE_STATE,
)
from phabmesh.dev.conduit.builds import Builds
from phabmesh.dev.conduit.php import Failure
from phabmesh.dev.conduit.store import Store, TestUser, _random


class Methods:
    """``conduit.*`` and ``user.*`` over a :class:`~phabmesh.dev.conduit.store.Store`."""

    def __init__(self, store: Store, hostname: str) -> None:
        self.store = store
        self.hostname = hostname
        self.builds = Builds()

    def execute(self, method: str, call: wire.Call, user: TestUser | None, base: str) -> Any:
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
        if method == "harbormaster.target.search":
            return self.builds.search(call.params)
        if method == "harbormaster.sendmessage":
            return self.builds.send_message(call.params, int(self.store.clock()))
        if method == "user.search":
            return self._search(call.params, user, strict=call.strict)
        if method == "user.edit":
            return self._edit(call.params, user, strict=call.strict)
        return self._toggle(call.params, user, disabled=method == "user.disable")

    def _search(self, params: dict[str, Any], viewer: TestUser, *, strict: bool) -> Any:
        """``PhabricatorApplicationSearchEngine::buildConduitResponse``, checks in its order."""
        query_key = params.get("queryKey")
        if query_key is not None and query_key != "" and query_key not in QUERY_KEYS:
            raise Failure("ERR-BAD-QUERYKEY", 'Invalid query for parameter "queryKey".')
        constraints = params.get("constraints")
        if constraints is None:
            constraints = {}
        if not isinstance(constraints, dict | list):
            raise Failure(
                "ERR-INVALID-CONSTRAINTS-FORMAT",
                'Parameter "constraints" must be a map of constraints.',
            )
        if isinstance(constraints, list):  # a PHP array all the same
            constraints = {str(i): v for i, v in enumerate(constraints)}
        allowed = CONSTRAINTS | ({"mfa"} if viewer.admin else set())
        if set(constraints) - allowed:
            raise Failure(
                "ERR-INVALID-CONSTRAINT", 'Parameter "constraints" includes an invalid key.'
            )
        users = self._filter(self.store.visible(query_key), constraints, strict)
        attachments = params.get("attachments")
        if attachments is None:
            attachments = {}
        if not isinstance(attachments, dict | list):
            raise Failure(
                "ERR-INVALID-ATTACHMENTS-FORMAT",
                'Parameter "attachments" must be a map of attachments.',
            )
        if isinstance(attachments, list):
            attachments = {str(i): v for i, v in enumerate(attachments)}
        if set(attachments) - ATTACHMENTS:
            raise Failure(
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

    @staticmethod
    def _filter(users: list[TestUser], constraints: dict[str, Any], strict: bool) -> list[TestUser]:
        """Read each constraint with its Conduit type (in field order), then filter."""
        if "usernames" in constraints:
            names = {
                php.read_string(f"usernames[{i}]", v)
                for i, v in enumerate(php.read_list("usernames", constraints["usernames"]))
            }
            users = [u for u in users if u.username in names]
        if "nameLike" in constraints:
            needle = php.read_string("nameLike", constraints["nameLike"]).lower()
            # PhabricatorPeopleQuery: username LIKE %x% OR realname LIKE %x%, case-insensitive.
            users = [
                u for u in users if needle in u.username.lower() or needle in u.real_name.lower()
            ]
        for name, attr in THREE_STATE:
            if name in constraints:
                flag = php.read_bool(name, constraints[name], strict)
                users = [u for u in users if getattr(u, attr) is flag]
        if "mfa" in constraints and php.read_bool("mfa", constraints["mfa"], strict):
            users = []  # nobody here has enrolled in MFA
        for name, newer in (("createdStart", True), ("createdEnd", False)):
            if name in constraints:
                epoch = php.read_int(name, constraints[name], strict)
                if epoch <= 0:
                    raise php.invalid(name, f"Epoch timestamp must be larger than 0, got {epoch}.")
                users = [
                    u
                    for u in users
                    if (u.date_created >= epoch if newer else u.date_created <= epoch)
                ]
        if "ids" in constraints:
            ids = {
                php.read_int(f"ids[{i}]", v, strict)
                for i, v in enumerate(php.read_list("ids", constraints["ids"], allow_empty=False))
            }
            users = [u for u in users if u.id in ids]
        if "phids" in constraints:
            phids = {
                php.read_string(f"phids[{i}]", v)
                for i, v in enumerate(
                    php.read_list("phids", constraints["phids"], allow_empty=False)
                )
            }
            users = [u for u in users if u.phid in phids]
        if "query" in constraints:
            words = php.read_string("query", constraints["query"]).lower().split()
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
            window = [u for u in users if u.id > php.php_intval(before)]
            page = window[-limit:]
        else:
            window = [u for u in users if after is None or u.id < php.php_intval(after)]
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
        if php.php_gt(raw, 100):
            raise Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Maximum page size for Conduit API method calls is 100, but this call "
                f"specified {php.php_string(raw)}.",
            )
        if php.php_lt(raw, 1):
            raise Failure(
                "ERR-INVALID-PAGE-SIZE",
                "Minimum page size for Conduit API method calls is 1, but this call "
                f"specified {php.php_string(raw)}.",
            )
        return max(1, min(100, php.php_intval(raw)))

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

    def _edit(self, params: dict[str, Any], viewer: TestUser, *, strict: bool) -> Any:
        target = params.get("objectIdentifier")
        if target is None:
            raise Failure(
                "ERR-CONDUIT-CORE",
                "[You Shall Not Pass: PhabricatorUserEditEngine] (Can Edit) You do not have "
                "permission to edit this object. // By default, no one can take this action.",
            )
        user = self.store.find(target)
        if user is None:
            raise Failure("ERR-CONDUIT-CORE", f'No object exists with ID "{target}".')
        xacts = []
        for xact in php.read_list("transactions", params.get("transactions") or []):
            if not isinstance(xact, dict) or xact.get("type") != "disabled":
                raise Failure("ERR-CONDUIT-CORE", "Unsupported transaction type.")
            if not viewer.admin:
                raise Failure(
                    "ERR-CONDUIT-CORE",
                    "[You Shall Not Pass: People] (Can Disable Users) You do not have permission "
                    "to disable or enable users. // Administrators can take this action.",
                )
            user.disabled = php.read_bool("value", xact.get("value"), strict)
            user.date_modified = int(self.store.clock())
            xacts.append({"phid": f"PHID-XACT-USER-{_random(15)}"})
        return {"object": {"id": user.id, "phid": user.phid}, "transactions": xacts}

    def _toggle(self, params: dict[str, Any], viewer: TestUser, *, disabled: bool) -> Any:
        if not viewer.admin:
            raise Failure("ERR-PERMISSIONS", "Only admins can call this method.")
        for phid in php.read_list("phids", params.get("phids") or []):
            user = self.store.find(phid)
            if user is not None:
                user.disabled = disabled
                user.date_modified = int(self.store.clock())
        return True
