"""The Conduit test server agrees with every recording of a real Phorge server.

Each recording (``tests/conduit/recordings/``, or the folder named by
``PHABMESH_CONDUIT_RECORDINGS``) is replayed over a real socket, its request
exactly as recorded (compressed bodies included), against a fresh test server
seeded with the lab's accounts and tokens as they were when that recording was
made. The seed comes from the recordings themselves, not from a list written
here (:class:`Lab`): accounts from ``user.search`` and ``user.whoami`` answers,
tokens and their owners from successful calls (or their ``token_ref``), and
each change made outside Conduit (a token terminated, expired or deleted, an
account disabled) from what the answers say and when they were recorded. Where a
folder never shows an account at all (a paging cursor alone hints at it), no
seed can: such a folder needs the recording that shows it.
The answer must agree: status, the headers a client reads, the encoding
(``Content-Encoding``, ``Vary``, the compressed bytes), and the decoded body.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import gzip
import hashlib
import http.client
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phabmesh.dev.conduit_server import ConduitServer

REPO = Path(__file__).resolve().parents[2]
IN_REPO = Path(__file__).resolve().parent / "recordings"
RECORDINGS = Path(os.environ.get("PHABMESH_CONDUIT_RECORDINGS") or IN_REPO)
# Where the recordings are kept beside this repository, when they are (not in a clone).
SHARED = REPO.parent.joinpath("shared", "conduit", "recordings")
INDEX = "INDEX.json"


@dataclasses.dataclass(frozen=True)
class Recording:
    """One recorded request and Phorge's answer."""

    name: str
    at: float
    server: str
    request: dict[str, Any]
    response: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> Recording:
        data = json.loads(path.read_text())
        at = datetime.datetime.fromisoformat(data["recorded_at"].replace("Z", "+00:00"))
        return cls(path.name, at.timestamp(), data["server"], data["request"], data["response"])

    @property
    def method(self) -> str:
        return str(self.request["conduit_method"])

    @property
    def params(self) -> dict[str, Any]:
        params = self.request.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def token(self) -> str | None:
        token = self.request.get("token")
        return str(token) if token else None

    @property
    def answer(self) -> dict[str, Any] | None:
        answer = self.response.get("json")
        return answer if isinstance(answer, dict) else None

    @property
    def succeeded(self) -> bool:
        return self.answer is not None and self.answer.get("error_code") is None

    @property
    def error_info(self) -> str:
        return str((self.answer or {}).get("error_info") or "")

    @property
    def result(self) -> Any:
        return (self.answer or {}).get("result")

    @property
    def headers(self) -> dict[str, str]:
        """Response headers: a list of pairs in newer recordings, a map in older ones."""
        raw = self.response["headers"]
        pairs = raw.items() if isinstance(raw, dict) else raw
        return {str(name).lower(): str(value) for name, value in pairs}

    @property
    def body(self) -> bytes:
        """The request body as sent: ``body_base64`` when it was compressed."""
        if self.request.get("body_base64"):
            return base64.b64decode(self.request["body_base64"])
        body = self.request.get("body")
        return body.encode() if body is not None else b""

    @property
    def sent(self) -> bytes:
        """The response body as Phorge sent it (compressed, when it was)."""
        if self.response.get("body_base64"):
            return base64.b64decode(self.response["body_base64"])
        return str(self.response["body"]).encode()


def recordings(folder: Path) -> list[Recording]:
    return [Recording.load(p) for p in sorted(folder.glob("*.json")) if p.name != INDEX]


FILES = recordings(RECORDINGS) if RECORDINGS.is_dir() else []


@dataclasses.dataclass
class Account:
    phid: str
    username: str
    real_name: str
    first_seen: float
    id: int | None = None
    bot: bool = False
    admin: bool = False
    date_created: int | None = None
    image_path: str | None = None
    email: str | None = None

    def exists_at(self, at: float) -> bool:
        born = self.first_seen if self.date_created is None else self.date_created
        return min(born, self.first_seen) <= at


# Errors Phorge gives as its refusal of a token, or can give before authenticating (an
# unknown method or parameter, a body it cannot read): a token that got one of these did
# not show that it authenticates.
BEFORE_OR_AT_AUTH = frozenset(
    {"ERR-INVALID-AUTH", "ERR-INVALID-SESSION", "ERR-CONDUIT-CALL", "ERR-CONDUIT-CORE"}
)


class Lab:
    """The lab server's accounts and tokens over time, as the recordings show them."""

    def __init__(self, recs: list[Recording]) -> None:
        self.accounts: dict[str, Account] = {}
        # phid -> (time, recording, disabled): what an answer showed of an account's state.
        self.seen: dict[str, list[tuple[float, str, bool]]] = {}
        # (time, phid, disabled): accounts disabled or enabled by a recorded call.
        self.changes: list[tuple[float, str, bool]] = []
        # (time, phid, disabled, dateModified): when an answer said an account last changed.
        self.modified_seen: list[tuple[float, str, bool, int]] = []
        self.owners: dict[str, str] = {}  # token -> phid
        ordered = sorted(recs, key=lambda r: (r.at, r.name))
        self.public = {r.method for r in ordered if r.succeeded and r.token is None}
        for rec in ordered:
            self._accounts(rec)
        for rec in ordered:
            self._tokens(rec)
        for rec in ordered:
            self._states(rec)
        self._number()

    def _account(
        self, rec: Recording, phid: str, username: str | None = None, real_name: str | None = None
    ) -> Account:
        """The account with this PHID, first seen in ``rec`` if new; named when an answer
        names it (an account only ever seen as a PHID gets a name of its own)."""
        account = self.accounts.get(phid)
        if account is None:
            name = username or f"user-{phid.removeprefix('PHID-USER-')[:8]}"
            account = self.accounts[phid] = Account(phid, name, real_name or name, rec.at)
        if username is not None:
            account.username, account.real_name = username, real_name or username
        return account

    def _accounts(self, rec: Recording) -> None:
        result = rec.result if rec.succeeded else None
        if rec.method == "user.search" and isinstance(result, dict):
            for row in result["data"]:
                fields = row["fields"]
                account = self._account(rec, row["phid"], fields["username"], fields["realName"])
                account.id = row["id"]
                account.date_created = fields["dateCreated"]
                account.bot = "bot" in fields["roles"]
                account.admin = "admin" in fields["roles"]
                disabled = "disabled" in fields["roles"]
                self._see(rec, row["phid"], disabled)
                self.modified_seen.append((rec.at, row["phid"], disabled, fields["dateModified"]))
        if rec.method == "user.whoami" and isinstance(result, dict):
            account = self._account(rec, result["phid"], result["userName"], result["realName"])
            account.bot = "agent" in result["roles"] or "bot" in result["roles"]
            account.admin = "admin" in result["roles"]
            account.image_path = result["image"].removeprefix(rec.server)
            account.email = result["primaryEmail"] or None
            if rec.token:
                self.owners[rec.token] = result["phid"]
        if rec.method == "user.edit" and isinstance(result, dict):
            self._account(rec, result["object"]["phid"]).id = result["object"]["id"]
        target = str(rec.params.get("objectIdentifier"))
        # An edit answered otherwise than with the account's absence: the account is there.
        refused = rec.answer is not None and "No object exists" not in rec.error_info
        if rec.method == "user.edit" and refused and target.startswith("PHID-USER-"):
            self._account(rec, target)

    def _tokens(self, rec: Recording) -> None:
        """A token's owner when no answer named it: the account its ``token_ref`` names (a
        username, or a username and a suffix: ``ci-bot-expired``); else, when Phorge knew
        the token (it authenticated, or was expired, or its account disabled), an account
        of its own that no answer shows more of."""
        ref = rec.request.get("token_ref")
        if not rec.token or rec.token in self.owners:
            return
        named = [a for a in self.accounts.values() if f"{ref}-".startswith(f"{a.username}-")]
        if ref and named:
            self.owners[rec.token] = max(named, key=lambda a: len(a.username)).phid
        elif self._known(rec):
            phid = "PHID-USER-" + hashlib.sha256(rec.token.encode()).hexdigest()[:20]
            username = ref or f"owner-{len(self.accounts) + 1}"
            self._account(rec, phid, username, username)
            self.owners[rec.token] = phid

    def _known(self, rec: Recording) -> bool:
        """Whether ``rec``'s answer shows that Phorge had its token."""
        return self._authenticated(rec) or rec.error_info.endswith(
            ("has expired.", "not permitted to use the API.")
        )

    def _authenticated(self, rec: Recording) -> bool:
        """Whether ``rec``'s token got past authentication: a result, or an error that only
        comes after it (ERR-CONDUIT-CORE and ERR-CONDUIT-CALL can come before)."""
        if rec.method in self.public or rec.answer is None:
            return False
        return rec.succeeded or rec.answer.get("error_code") not in BEFORE_OR_AT_AUTH

    def _states(self, rec: Recording) -> None:
        owner = self.owners.get(rec.token or "")
        if owner and rec.answer is not None:
            if self._authenticated(rec):
                self._see(rec, owner, False)  # authenticated: the account is enabled
            elif "not permitted to use the API" in rec.error_info:
                self._see(rec, owner, True)
        changed = len(self.changes)
        if rec.succeeded and rec.method == "user.edit":
            for xact in rec.params.get("transactions") or []:
                if isinstance(xact, dict) and xact.get("type") == "disabled":
                    phid = rec.result["object"]["phid"]
                    self.changes.append((rec.at, phid, bool(xact["value"])))
        if rec.succeeded and rec.method in ("user.disable", "user.enable"):
            for phid in rec.params.get("phids") or []:
                self.changes.append((rec.at, phid, rec.method == "user.disable"))
        if owner and len(self.changes) > changed:
            self.accounts[owner].admin = True  # only administrators disable or enable

    def _see(self, rec: Recording, phid: str, disabled: bool) -> None:
        self.seen.setdefault(phid, []).append((rec.at, rec.name, disabled))

    def _number(self) -> None:
        """Accounts no search listed get the next ids, in the order they appeared."""
        next_id = max((a.id or 0 for a in self.accounts.values()), default=0) + 1
        for account in sorted(self.accounts.values(), key=lambda a: a.first_seen):
            if account.id is None:
                account.id, next_id = next_id, next_id + 1

    def disabled(self, phid: str, rec: Recording) -> bool:
        """The account's state when ``rec`` was made: as ``rec`` shows it, else as the
        nearest answer in time showed it (before it, or else after it)."""
        seen = self.seen.get(phid, [])
        own = [d for _, name, d in seen if name == rec.name]
        if own:
            return own[-1]
        changed = [(t, d) for t, p, d in self.changes if p == phid and t < rec.at]
        before = [(t, d) for t, _, d in seen if t <= rec.at] + changed
        if before:
            return max(before, key=lambda s: s[0])[1]
        return min(seen, key=lambda s: s[0])[2] if seen else False

    def modified(self, account: Account, disabled: bool, rec: Recording) -> int:
        """dateModified: the last recorded change to this state; else what the nearest answer
        showing the account in this state said; else its creation."""
        state = (account.phid, disabled)
        times = [t for t, p, d in self.changes if (p, d) == state and t <= rec.at]
        if not times:
            shown = [
                (abs(rec.at - t), -t, m) for t, p, d, m in self.modified_seen if (p, d) == state
            ]
            times = [min(shown)[2]] if shown else []
        created = account.date_created if account.date_created is not None else account.first_seen
        return int(max(times, default=created))

    def seed(self, server: ConduitServer, rec: Recording) -> None:
        server.clock = lambda: rec.at
        server.down = rec.response["status"] >= 500
        server.rate_limited = rec.response["status"] == 429
        if rec.method == "conduit.ping" and rec.succeeded:
            server.hostname = str(rec.result)  # the lab's host name
        for account in sorted(self.accounts.values(), key=lambda a: a.id or 0):
            if not account.exists_at(rec.at):
                continue
            disabled = self.disabled(account.phid, rec)
            user = server.add_user(
                account.username,
                id=account.id,
                phid=account.phid,
                real_name=account.real_name,
                bot=account.bot,
                admin=account.admin,
                disabled=disabled,
                email=account.email,
                image_path=account.image_path,
                date_created=account.date_created or int(account.first_seen),
            )
            user.date_modified = self.modified(account, disabled, rec)
        by_phid = {u.phid: u.username for u in server.users.values()}
        for token, phid in self.owners.items():
            if phid in by_phid:
                server.add_token(by_phid[phid], token)
        # The one token this recording shows the state of: gone, or expired (terminated in
        # the web UI, or its expiry set in the past).
        if rec.token in server.tokens and rec.answer is not None and not rec.succeeded:
            if rec.error_info.endswith("is not valid."):
                server.delete_token(rec.token)
            elif rec.error_info.endswith("has expired."):
                server.terminate_token(rec.token)


LAB = Lab(FILES)


@pytest.fixture
def server() -> Iterator[ConduitServer]:
    srv = ConduitServer()
    srv.start()
    yield srv
    srv.stop()


# Compared exactly. Left out as volatile or about the lab's web server rather than
# Conduit: Date, Set-Cookie (a fresh anonymous session each time), Host, Connection,
# X-Powered-By (the PHP build), Content-Security-Policy (names the lab's address),
# and Content-Length. An absent header must be absent.
STABLE_HEADERS = (
    "Content-Type",
    "X-Conduit-Capabilities",
    "Cache-Control",
    "Expires",
    "X-Frame-Options",
    "Referrer-Policy",
    "X-Content-Type-Options",
    "Content-Encoding",
    "Vary",
)
_XACT = re.compile(r"PHID-XACT-USER-[a-z0-9]{15}")


def _send(server: ConduitServer, rec: Recording) -> tuple[int, http.client.HTTPMessage, bytes]:
    """The request with exactly the recorded headers (and Host, Content-Length): the
    answer's status, headers and body as sent."""
    request = rec.request
    target = request["path"] + (f"?{request['query_string']}" if request["query_string"] else "")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest(request["http_method"], target, skip_accept_encoding=True)
        for name, value in request["headers"].items():
            conn.putheader(name, value)
        body = rec.body
        if body or request["http_method"] == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _decode(raw: bytes, coding: str | None) -> bytes:
    if coding == "gzip":
        return gzip.decompress(raw)
    if coding == "deflate":
        return zlib.decompress(raw)
    assert coding is None, coding
    return raw


def _escaped(url: str) -> str:
    return url.replace("/", "\\/")  # as PHP's json_encode writes it


def test_the_recordings_are_there() -> None:
    """Loud, never a skip: without its recordings this suite proves nothing."""
    assert RECORDINGS.is_dir(), f"no recordings folder at {RECORDINGS}"
    assert FILES, f"no recordings in {RECORDINGS}"
    index = json.loads((RECORDINGS / INDEX).read_text())
    assert sorted(entry["file"] for entry in index) == [r.name for r in FILES]


@pytest.mark.parametrize("rec", FILES or [None], ids=[r.name for r in FILES] or ["missing"])
def test_server_agrees_with_recording(server: ConduitServer, rec: Recording | None) -> None:
    assert rec is not None, f"no recordings in {RECORDINGS}"
    _replay(server, rec)


def _gzipped(rec: Recording) -> Recording:
    """The same call with its body gzipped, as arcanist sends it once it may."""
    request = dict(rec.request)
    request["headers"] = {**request["headers"], "Content-Encoding": "gzip"}
    request["body_base64"] = base64.b64encode(gzip.compress(rec.body)).decode()
    return dataclasses.replace(rec, request=request)


ARCANIST_STYLE = [r for r in FILES if r.request.get("encoding") == "params-json" and r.body]


@pytest.mark.parametrize("rec", ARCANIST_STYLE, ids=[r.name for r in ARCANIST_STYLE])
def test_a_compressed_request_body_gets_the_same_answer(
    server: ConduitServer, rec: Recording
) -> None:
    compressed = _gzipped(rec)
    assert compressed.body != rec.body
    assert gzip.decompress(compressed.body) == rec.body
    _replay(server, compressed)


def test_response_headers_are_read_in_either_shape() -> None:
    """Newer recordings keep response headers as a list of pairs, older ones as a map."""
    rec = FILES[0] if FILES else pytest.fail(f"no recordings in {RECORDINGS}")
    pairs = [["Content-Type", "application/json"], ["Vary", "Accept-Encoding"]]
    as_list = dataclasses.replace(rec, response={**rec.response, "headers": pairs})
    as_map = dataclasses.replace(rec, response={**rec.response, "headers": dict(pairs)})
    assert (
        as_list.headers
        == as_map.headers
        == {
            "content-type": "application/json",
            "vary": "Accept-Encoding",
        }
    )


def _replay(server: ConduitServer, rec: Recording) -> None:
    LAB.seed(server, rec)
    status, headers, raw = _send(server, rec)
    assert status == rec.response["status"]
    recorded = rec.headers
    for name in STABLE_HEADERS:
        assert headers.get(name) == recorded.get(name.lower()), name
    coding = headers.get("Content-Encoding")
    text = _decode(raw, coding).decode()
    if rec.answer is None:
        # Phorge's fatal page: same message, its inline stylesheet aside.
        assert "Can Not Connect to MySQL" in text
        assert "<title>Setup Error</title>" in text
        return
    # Byte for byte, once this server's address is the lab's and random PHIDs are masked.
    mine = _XACT.sub("PHID-XACT-USER-*", text.replace(_escaped(server.url), _escaped(rec.server)))
    assert mine == _XACT.sub("PHID-XACT-USER-*", rec.response["body"])
    if text == rec.response["body"]:
        assert raw == rec.sent  # compressed as PHP compresses, byte for byte


def test_the_in_repo_copy_is_current() -> None:
    """The recordings here equal the ones kept beside the repository, when those exist."""
    if not SHARED.is_dir():
        pytest.skip(f"no {SHARED} beside the repository (a clone has none): nothing to compare")
    assert differences(IN_REPO, SHARED) == []


def differences(ours: Path, theirs: Path) -> list[str]:
    """File names missing on either side, or whose bytes differ."""
    mine = {p.name: p for p in ours.iterdir() if p.is_file()}
    other = {p.name: p for p in theirs.iterdir() if p.is_file()}
    out = [f"only in {theirs}: {n}" for n in sorted(other.keys() - mine.keys())]
    out += [f"only in {ours}: {n}" for n in sorted(mine.keys() - other.keys())]
    out += [
        f"differs: {n}"
        for n in sorted(mine.keys() & other.keys())
        if mine[n].read_bytes() != other[n].read_bytes()
    ]
    return out
