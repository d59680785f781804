"""The Conduit test server agrees with every recording of a real Phorge server.

Each recording is replayed over a real socket against a fresh test server seeded
with the lab's accounts and tokens as they were when that recording was made
(the lab disabled old-bot, terminated and expired tokens, and later created and
revoked revoke-bot: the seed follows that timeline).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from phabmesh.testing import ConduitServer

RECORDINGS = Path(
    os.environ.get(
        "PHABMESH_CONDUIT_RECORDINGS",
        Path(__file__).resolve().parents[2].parent / "shared" / "conduit" / "recordings",
    )
)
FILES = sorted(p for p in RECORDINGS.glob("*.json") if p.name != "INDEX.json")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RECORDINGS / name).read_text())
    return data


def _epoch(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _tokens() -> dict[str, str]:
    """token_ref → token, as the recordings used them."""
    out: dict[str, str] = {}
    for path in FILES:
        request = json.loads(path.read_text())["request"]
        if request.get("token_ref") and request.get("token"):
            out[request["token_ref"]] = request["token"]
    return out


# The lab's accounts (from user.search and user.whoami recordings).
ACCOUNTS = [
    dict(
        username="admin",
        id=1,
        phid="PHID-USER-qpbt6yqqyjyh7xdvfuut",
        real_name="Lab Admin",
        admin=True,
        date_created=1795334101,
    ),
    dict(
        username="ci-bot",
        id=2,
        phid="PHID-USER-5ardvnwnb7c5z552bwgt",
        real_name="CI Bot",
        bot=True,
        date_created=1795334126,
    ),
    dict(
        username="deploy-bot",
        id=3,
        phid="PHID-USER-cr7hhfz6pw5elv2plxel",
        real_name="Deploy Bot",
        bot=True,
        date_created=1795334126,
    ),
    dict(
        username="old-bot",
        id=4,
        phid="PHID-USER-thrdjspizhk3a6jvoodg",
        real_name="Old Bot (to be disabled)",
        bot=True,
        date_created=1795334126,
    ),
]
REVOKE_BOT = dict(
    username="revoke-bot",
    id=5,
    phid="PHID-USER-zjwnv2i5mfrfjchjwgi7",
    real_name="Revoke Bot",
    bot=True,
    date_created=1795334126,
)
# Captured after old-bot was disabled (user.edit.disable-old-bot.admin, same second).
AFTER_OLD_BOT_DISABLED = {
    "auth.error.disabled-bot-token.json",
    "auth.error.disabled-bot-token.user.search.json",
    "user.search.isDisabled-true.json",
    "user.search.usernames-old-bot.json",
}
# Captured after revoke-bot's tokens were deleted with bin/auth revoke.
AFTER_REVOKE = {"auth.error.revoked-via-bin-auth.json"}


def _image_paths() -> dict[str, str]:
    paths = {}
    for path in FILES:
        rec = json.loads(path.read_text())
        result = (rec["response"].get("json") or {}).get("result")
        if rec["request"]["conduit_method"] == "user.whoami" and isinstance(result, dict):
            paths[result["userName"]] = result["image"][len(rec["server"]) :]
    return paths


def seed(server: ConduitServer, name: str, recorded_at: float) -> None:
    images = _image_paths()
    accounts = list(ACCOUNTS)
    if name.startswith("auth.") and "revoke" in name:
        accounts.append(REVOKE_BOT)
    for account in accounts:
        server.add_user(**account, image_path=images.get(str(account["username"])))  # type: ignore[arg-type]
    if name in AFTER_OLD_BOT_DISABLED:
        disabled_at = _epoch(_load("user.edit.disable-old-bot.admin.json")["recorded_at"])
        server.users["old-bot"].disabled = True
        server.users["old-bot"].date_modified = int(disabled_at)
    tokens = _tokens()
    for ref, user in [
        ("admin", "admin"),
        ("ci-bot", "ci-bot"),
        ("old-bot", "old-bot"),
        ("ci-bot-terminated", "ci-bot"),
    ]:
        server.add_token(user, tokens[ref])
    expired = name == "auth.error.expired-token.json"
    server.add_token(
        "ci-bot", tokens["ci-bot-expired"], recorded_at - 3600 if expired else recorded_at + 3600
    )
    server.terminate_token(tokens["ci-bot-terminated"])
    if "revoke-bot" in server.users and name not in AFTER_REVOKE:
        server.add_token("revoke-bot", tokens["revoke-bot"])
    server.down = name.startswith("server.error.db-down")


@pytest.fixture
def server() -> Iterator[ConduitServer]:
    srv = ConduitServer()
    srv.start()
    yield srv
    srv.stop()


# Compared exactly. Left out as volatile or about the lab's web server rather than
# Conduit: Date, Set-Cookie (a fresh anonymous session each time), Host, Connection,
# X-Powered-By (the PHP build), Content-Security-Policy (names the lab's address),
# and Content-Length.
STABLE_HEADERS = (
    "Content-Type",
    "X-Conduit-Capabilities",
    "Cache-Control",
    "Expires",
    "X-Frame-Options",
    "Referrer-Policy",
    "X-Content-Type-Options",
)


def _normalise(value: Any, recorded_base: str, base: str) -> Any:
    if isinstance(value, str):
        value = value.replace(recorded_base, base)
        return re.sub(r"PHID-XACT-USER-[a-z0-9]{15}", "PHID-XACT-USER-*", value)
    if isinstance(value, list):
        return [_normalise(v, recorded_base, base) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v, recorded_base, base) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_server_agrees_with_recording(server: ConduitServer, path: Path) -> None:
    rec = json.loads(path.read_text())
    request, expected = rec["request"], rec["response"]
    recorded_at = _epoch(rec["recorded_at"])
    server.clock = lambda: recorded_at
    seed(server, path.name, recorded_at)

    body = request["body"].encode() if request["body"] is not None else None
    response = requests.request(
        request["http_method"],
        server.url
        + request["path"]
        + (f"?{request['query_string']}" if request["query_string"] else ""),
        data=body,
        headers=request["headers"],
        timeout=10,
    )
    assert response.status_code == expected["status"]
    headers = dict(expected["headers"])
    for name in STABLE_HEADERS:
        assert response.headers.get(name) == headers.get(name), name
    if expected["status"] != 200:
        # Phorge's fatal page: same message, its inline stylesheet aside.
        assert "Can Not Connect to MySQL" in response.text
        assert "<title>Setup Error</title>" in response.text
        return
    got = response.json()
    want = _normalise(expected["json"], rec["server"], server.url)
    if request["conduit_method"] == "conduit.ping" and want["result"] is not None:
        # The result is the server's host name, which differs from the lab's.
        assert isinstance(got["result"], str) and got["result"]
        got["result"] = want["result"]
    assert _normalise(got, server.url, server.url) == want
    # Slashes escaped like PHP's json_encode, wherever there are any.
    assert ("\\/" in response.text) == ("\\/" in expected["body"])


def test_every_recording_is_replayed() -> None:
    index = json.loads((RECORDINGS / "INDEX.json").read_text())
    assert sorted(entry["file"] for entry in index) == [p.name for p in FILES]
    assert len(FILES) >= 60
