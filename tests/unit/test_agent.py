"""The credential agent (`phabmesh agent`): its files, its refusals, its retries."""

from __future__ import annotations

import datetime
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from phabmesh.pod import agent
from phabmesh.pod import client as podclient
from tests.unit.conftest import FakeEndpoint

TOKEN = "api-" + "a" * 28
GATEWAY = "http://phabmesh-gateway.phabmesh-system.svc:8080"


def _credential(token: str = TOKEN) -> podclient.Credential:
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=15)
    return podclient.Credential(token, expires, "id", "runners", "ci-bot", "phorge-token")


def test_arcrc_names_the_gateway_as_host_and_default() -> None:
    body = json.loads(agent.arcrc(GATEWAY + "/", TOKEN))
    assert body == {
        "hosts": {f"{GATEWAY}/api/": {"token": TOKEN}},
        "config": {"default": f"{GATEWAY}/"},
    }


def test_the_files_are_private_and_replaced_whole(tmp_path: Path) -> None:
    write = agent.Writer(tmp_path / "dir", GATEWAY)
    write(_credential())
    write(_credential("api-" + "b" * 28))
    credential, arcrc = tmp_path / "dir" / "credential", tmp_path / "dir" / ".arcrc"
    assert credential.read_text() == "api-" + "b" * 28 + "\n"
    assert json.loads(arcrc.read_text())["hosts"][f"{GATEWAY}/api/"]["token"] == "api-" + "b" * 28
    for path in (credential, arcrc):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == [".arcrc", "credential"]


def test_init_retries_until_its_timeout_then_tells_why(tmp_path: Path) -> None:
    now = [0.0]
    calls: list[float] = []

    def fetch() -> podclient.Credential:
        calls.append(now[0])
        raise podclient.ExchangeError('403 no_lease: PhabricatorBinding "x" is not Ready')

    def sleep(seconds: float) -> None:
        now[0] += seconds

    log = tmp_path / "termination-log"
    code = agent.run_init(
        fetch, lambda _c: None, timeout=30, termination_log=log, sleep=sleep, clock=lambda: now[0]
    )
    assert code == 1
    assert len(calls) > 2 and calls[-1] >= 30
    assert log.read_text() == 'no credential: 403 no_lease: PhabricatorBinding "x" is not Ready\n'


def test_init_stops_at_once_when_the_refusal_is_final(tmp_path: Path) -> None:
    calls = []

    def fetch() -> podclient.Credential:
        calls.append(1)
        raise podclient.ExchangeError("401 invalid_token: bad", status=401, retryable=False)

    log = tmp_path / "termination-log"
    assert agent.run_init(fetch, lambda _c: None, timeout=300, termination_log=log) == 1
    assert calls == [1]
    assert "401 invalid_token" in log.read_text()


def test_init_writes_one_credential(tmp_path: Path) -> None:
    written: list[podclient.Credential] = []
    log = tmp_path / "termination-log"
    assert agent.run_init(_credential, written.append, timeout=1, termination_log=log) == 0
    assert [c.token for c in written] == [TOKEN]
    assert not log.exists()


def _agent(endpoint: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    token_file = tmp_path / "token"
    token_file.write_text("service-account-token")
    argv = [sys.executable, "-m", "phabmesh.cli", "agent", "init", "--endpoint", endpoint]
    argv += ["--token-file", str(token_file), "--dir", str(tmp_path / "run"), "--timeout", "5"]
    env = dict(os.environ, PHABMESH_GATEWAY_URL=GATEWAY)
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_init_command_writes_the_files_and_never_prints_the_credential(
    endpoint: str, tmp_path: Path
) -> None:
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)).isoformat()
    FakeEndpoint.answers[:] = [
        (200, {"credential": TOKEN, "expiresAt": expires, "binding": "runners", "bot": "ci-bot"})
    ]
    done = _agent(endpoint, tmp_path, "--termination-log", str(tmp_path / "log"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "credential").read_text() == TOKEN + "\n"
    arcrc = json.loads((tmp_path / "run" / ".arcrc").read_text())
    assert arcrc["hosts"][f"{GATEWAY}/api/"] == {"token": TOKEN}
    assert "credential_written" in done.stderr
    assert TOKEN not in done.stdout + done.stderr


def test_the_init_command_fails_with_the_endpoints_reason(endpoint: str, tmp_path: Path) -> None:
    message = "the token is not a valid service-account token for audience phabmesh.io"
    FakeEndpoint.answers[:] = [(401, {"error": "invalid_token", "message": message})]
    log = tmp_path / "log"
    done = _agent(endpoint, tmp_path, "--termination-log", str(log))
    assert done.returncode == 1
    assert log.read_text() == f"no credential: 401 invalid_token: {message}\n"
    assert message in done.stderr  # in the container's log as well
    assert not (tmp_path / "run" / "credential").exists()
