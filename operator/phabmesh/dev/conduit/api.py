"""What Phorge's Conduit API looks like to a client, as the recordings show it: its public
methods, each method's parameters, its constraints and attachments, its capabilities, and
the pages its web server answers with when the database is gone or a client is limited."""

from __future__ import annotations

import string
from typing import Any

_ALNUM = string.ascii_lowercase + string.digits
PUBLIC_METHODS = frozenset({"conduit.ping", "conduit.getcapabilities"})
PARAMS: dict[str, frozenset[str]] = {
    "conduit.ping": frozenset(),
    "conduit.getcapabilities": frozenset(),
    "conduit.query": frozenset(),
    "user.whoami": frozenset(),
    "user.search": frozenset(
        {"queryKey", "constraints", "attachments", "order", "before", "after", "limit"}
    ),  # SEARCH_PARAMS' keys (defined below)
    "user.edit": frozenset({"transactions", "objectIdentifier"}),
    "user.disable": frozenset({"phids"}),
    "user.enable": frozenset({"phids"}),
    "harbormaster.target.search": frozenset(
        {"queryKey", "constraints", "attachments", "order", "before", "after", "limit"}
    ),  # SEARCH_PARAMS' keys
    "harbormaster.sendmessage": frozenset({"receiver", "type", "unit", "lint", "buildTargetPHID"}),
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
# Every *.search method's parameters (PhabricatorSearchEngineAPIMethod).
SEARCH_PARAMS = {
    "queryKey": "optional string",
    "constraints": "optional map<string, wild>",
    "attachments": "optional map<string, bool>",
    "order": "optional order",
    "before": "optional string",
    "after": "optional string",
    "limit": "optional int (default = 100)",
}
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
    "harbormaster.sendmessage": {
        "description": "Modify running builds, and report build results.",
        "params": {
            "receiver": "required string|phid",
            "type": 'required string-constant<"abort", "fail", "pass", "pause", '
            '"restart", "resume", "work">',
            "unit": "optional list<wild>",
            "lint": "optional list<wild>",
            "buildTargetPHID": "deprecated optional phid",
        },
        "return": "void",
    },
    "harbormaster.target.search": {
        "description": "Retrieve information about Harbormaster build targets.",
        "params": SEARCH_PARAMS,
        "return": "map<string, wild>",
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
        "params": SEARCH_PARAMS,
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
