"""Real, unmodified third-party Conduit clients through the gateway: arc (Debian's arcanist),
the `phabricator` and `phabfive` packages from PyPI and canduit from npm, as `make clients`
installs them (tests/clients/). Each is configured with nothing but the gateway's URL and a
credential that `phabmesh credential` got for a pod, and each must: name the bot
(`user.whoami`), find it (`user.search`), be refused a method outside the binding's
`allowedMethods`, and be refused once the pod is gone, each refusal surfacing as that
client's own error.

Against the Conduit test server always; against a real Phorge too when
PHABMESH_E2E_PHABRICATOR_URL, PHABMESH_E2E_BOT_USERNAME and PHABMESH_E2E_BOT_TOKEN are set
(otherwise those tests skip, saying so). docs/clients.md says what each client sends and
expects; docs/phabricator.md how to run against a real Phorge."""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
import requests
from kubernetes import client

from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.dev.conduit import api as conduit_server
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.processes.operator import OperatorProcess
from phabmesh.settings import Settings
from tests.kube import Cluster, create_hand_node, wait_for
from tests.phab import (
    SYSTEM,
    active_leases,
    binding_condition,
    label_namespace,
    make_binding,
    make_pod,
    pod_token,
    register_bot,
)
from tests.stack import Threaded

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "tests" / "clients"
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin"
NODE_MODULES = ROOT / "build" / "clients" / "node" / "node_modules"
NS = "clients"
# phabfive reads conduit.query before anything else; the rest is what the tests call.
ALLOWED = ["user.whoami", "user.search", "conduit.ping", "conduit.query"]
FORBIDDEN = "maniphest.search"
REAL_PHORGE = {
    "url": "PHABMESH_E2E_PHABRICATOR_URL",
    "bot": "PHABMESH_E2E_BOT_USERNAME",
    "token": "PHABMESH_E2E_BOT_TOKEN",
}
TIMEOUT = 60


@dataclasses.dataclass
class Answer:
    """What a client made of one call: its result, or the error it reported."""

    result: Any = None
    error_code: str | None = None
    error: str = ""  # the client's own words for the error (never holds the credential)
    output: str = ""  # what the client printed, for failure messages

    def __str__(self) -> str:
        return self.output[-2000:]


class Stack:
    """A private control plane, the operator and the gateway, against one Phabricator."""

    def __init__(self, plane: devcluster.ControlPlane, url: str, bot: str) -> None:
        self.cluster = Cluster(plane)
        self.url = url
        self.bot = bot
        self.settings = Settings.local(
            url, namespace=SYSTEM, conduit_timeout=10.0, bot_recheck_interval=30.0
        )
        self.operator: Threaded | None = None
        self.gateway: Threaded | None = None

    def start(self, bot_token: str) -> None:
        kubeconfig = self.cluster.phabmesh_kubeconfig("operator")
        self.operator = Threaded(OperatorProcess(self.settings, kubeconfig=kubeconfig)).start()
        wait_for(self.operator.process.ready, timeout=180, what="operator ready")  # type: ignore[attr-defined]
        gateway = GatewayProcess(
            self.settings, kubeconfig=self.cluster.phabmesh_kubeconfig("gateway")
        )
        self.gateway = Threaded(gateway).start()
        wait_for(lambda: gateway.state.ready, timeout=180, what="gateway ready")
        register_bot(self.cluster, self.bot, bot_token)
        label_namespace(self.cluster, NS)
        make_binding(self.cluster, NS, "runners", self.bot, allowedMethods=ALLOWED)
        wait_for(
            lambda: (c := binding_condition(self.cluster, NS, "runners")) and c["status"] == "True",
            timeout=60,
            what="binding Ready",
        )

    def stop(self) -> None:
        for proc in (self.gateway, self.operator):
            if proc is not None:
                proc.stop()

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return f"http://127.0.0.1:{self.gateway.process.port}"  # type: ignore[attr-defined]

    def pod(self, name: str) -> client.V1Pod:
        pod = make_pod(self.cluster, NS, name)
        wait_for(
            lambda: any(x["spec"]["podName"] == name for x in active_leases(self.cluster, NS)),
            what=f"a lease for {name}",
        )
        return pod

    def credential(self, pod: client.V1Pod, workdir: Path, *args: str) -> str:
        """`phabmesh credential`, the real CLI, exchanging the pod's service-account token."""
        assert self.operator is not None
        token_file = workdir / "serviceaccount-token"
        token_file.write_text(pod_token(self.cluster, NS, pod))
        port = self.operator.process.endpoint_port  # type: ignore[attr-defined]
        endpoint = ["--endpoint", f"http://127.0.0.1:{port}", "--token-file", str(token_file)]
        done = subprocess.run(
            [sys.executable, "-m", "phabmesh.cli", "credential", "--print", *endpoint, *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"phabmesh credential failed: {done.stderr[-2000:]}"
        credential = done.stdout.strip()
        # The gateway admits it once its lease watch has the lease.
        wait_for(lambda: self.refusal(credential) is None, what="the gateway to admit it")
        return credential

    def refusal(self, credential: str) -> str | None:
        """The gateway's refusal of a plain `user.whoami` with ``credential``, if any."""
        reply = requests.post(
            f"{self.gateway_url}/api/user.whoami",
            data={"api.token": credential},
            headers={"Accept-Encoding": "identity"},
            timeout=15,
        )
        try:
            answer = reply.json()
        except ValueError:
            # Not the gateway's own words (its refusals are plain JSON): Phabricator's answer.
            return None
        code = answer.get("error_code")
        return str(code) if code else None


def _real_phorge() -> dict[str, str]:
    values = {key: os.environ.get(name, "") for key, name in REAL_PHORGE.items()}
    missing = [REAL_PHORGE[key] for key, value in values.items() if not value]
    if missing:
        pytest.skip(
            "real-Phorge mode is opt-in and not configured: set "
            + ", ".join(missing)
            + " (docs/phabricator.md)"
        )
    return values


@pytest.fixture(scope="module", params=["conduit test server", "real Phorge"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    conduit: ConduitServer | None = None
    if request.param == "real Phorge":
        real = _real_phorge()
        url, bot, bot_token = real["url"].rstrip("/"), real["bot"], real["token"]
    else:
        conduit = ConduitServer()
        conduit.start()
        bot = "ci-bot"
        conduit.add_user(bot, bot=True)
        url, bot_token = conduit.url, conduit.add_token(bot)
    try:
        with devcluster.ControlPlane(tmp_path_factory.mktemp("controlplane")) as plane:
            made = Stack(plane, url, bot)
            create_hand_node(made.cluster.core)
            made.cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
            made.cluster.kubectl(
                "wait", "--for=condition=Established", "--all", "crd", "--timeout=60s"
            )
            for name in (SYSTEM, NS):
                made.cluster.core.create_namespace(
                    client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
                )
            wait_for(
                lambda: made.cluster.core.list_namespaced_service_account(NS).items,
                what="default SA",
            )
            try:
                made.start(bot_token)
                yield made
            finally:
                made.stop()
            made.cluster.assert_nothing_forbidden()
    finally:
        if conduit is not None:
            conduit.stop()


# The clients. Each runs as its own process in an empty HOME (no ~/.arcrc, no config file),
# told only the gateway's URL and the credential.


def _installed(path: Path | str | None, what: str) -> str:
    if path is None or not Path(path).exists():
        pytest.fail(f"{what} is not installed: run `make clients` (see tests/clients/)")
    return str(path)


def _run(
    argv: list[str], home: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**base, **env},
        cwd=home,
        check=False,
    )


def _printed(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"


def _json_answer(done: subprocess.CompletedProcess[str]) -> Answer:
    """The drivers' and arc's JSON on stdout: a result, or an error code."""
    output = _printed(done)
    try:
        printed = json.loads(done.stdout)
    except ValueError:
        return Answer(error=done.stderr.strip() or "no answer", output=output)
    code = printed.get("error_code", printed.get("error"))
    if code:
        info = printed.get("error_info", printed.get("errorMessage"))
        return Answer(error_code=code, error=f"{code}: {info}", output=output)
    return Answer(result=printed.get("result", printed.get("response")), output=output)


class Client:
    """A Conduit client: one call at a time, as (method, params)."""

    name = ""
    phorge_token = False  # the client accepts only Phorge-shaped tokens
    revoked_says = "ERR-INVALID-AUTH"  # how the client reports ERR-INVALID-AUTH

    def call(
        self, url: str, credential: str, method: str, params: dict[str, Any], home: Path
    ) -> Answer:
        raise NotImplementedError

    def whoami(self, url: str, credential: str, home: Path) -> Answer:
        answer = self.call(url, credential, "user.whoami", {}, home)
        if answer.error_code is None and isinstance(answer.result, dict):
            answer.result = answer.result.get("userName")
        return answer

    def search(self, url: str, credential: str, username: str, home: Path) -> Answer:
        params = {"constraints": {"usernames": [username]}}
        answer = self.call(url, credential, "user.search", params, home)
        if answer.error_code is None and isinstance(answer.result, dict):
            answer.result = [u["fields"]["username"] for u in answer.result["data"]]
        return answer

    def forbidden(self, url: str, credential: str, home: Path) -> Answer:
        return self.call(url, credential, FORBIDDEN, {}, home)


class Arc(Client):
    """`arc call-conduit --conduit-uri URL/`, the token in an ~/.arcrc for that URL (as
    `arc install-certificate` writes it; not on the command line, where `ps` shows it),
    the parameters on stdin."""

    name = "arc"
    # ArcanistConduitCallFuture turns ERR-INVALID-AUTH into its own "INVALID CREDENTIALS".
    revoked_says = "INVALID CREDENTIALS"

    def call(
        self, url: str, credential: str, method: str, params: dict[str, Any], home: Path
    ) -> Answer:
        arc = _installed(shutil.which("arcanist"), "arc (Debian's arcanist)")
        arcrc = home / ".arcrc"
        arcrc.write_text(json.dumps({"hosts": {f"{url}/api/": {"token": credential}}}))
        arcrc.chmod(0o600)
        argv = [arc, "call-conduit", "--conduit-uri", f"{url}/", "--", method]
        done = _run(argv, home, stdin=json.dumps(params))
        answer = _json_answer(done)
        if done.returncode != 0 and answer.error_code is None:
            answer.error = done.stderr.strip()
        return answer


class PhabricatorPackage(Client):
    """``Phabricator(host=URL + "/api/", token=...)`` (tests/clients/python/call_phabricator.py)."""

    name = "phabricator"

    def call(
        self, url: str, credential: str, method: str, params: dict[str, Any], home: Path
    ) -> Answer:
        python = _installed(CLIENTS_PYTHON / "python", "the phabricator package")
        driver = str(CLIENTS / "python" / "call_phabricator.py")
        argv = [python, driver, url + "/api/", method, json.dumps(params)]
        return _json_answer(_run(argv, home, CONDUIT_TOKEN=credential))


class Canduit(Client):
    """``createCanduit({api: URL + "/api/", token})`` (tests/clients/node/call.js)."""

    name = "canduit"

    def call(
        self, url: str, credential: str, method: str, params: dict[str, Any], home: Path
    ) -> Answer:
        node = _installed(shutil.which("node"), "node")
        _installed(NODE_MODULES / "canduit", "canduit")
        argv = [node, str(CLIENTS / "node" / "call.js"), url + "/api/", method, json.dumps(params)]
        return _json_answer(_run(argv, home, CONDUIT_TOKEN=credential, NODE_PATH=str(NODE_MODULES)))


class Phabfive(Client):
    """The `phabfive` command, configured by PHAB_URL and PHAB_TOKEN."""

    name = "phabfive"
    phorge_token = True  # it checks PHAB_TOKEN against ^[a-zA-Z0-9-]{32}$
    ERROR = re.compile(r"^Error: (ERR-[A-Z-]+): (.*)$", re.MULTILINE)

    def command(self, url: str, credential: str, home: Path, *args: str) -> Answer:
        phabfive = _installed(CLIENTS_PYTHON / "phabfive", "phabfive")
        done = _run(
            [phabfive, "--format", "json", *args],
            home,
            PHAB_URL=url + "/api/",
            PHAB_TOKEN=credential,
        )
        output = _printed(done)
        if done.returncode != 0:
            found = self.ERROR.search(done.stderr)
            return Answer(
                error_code=found.group(1) if found else None,
                error=found.group(0) if found else done.stderr.strip(),
                output=output,
            )
        return Answer(result=json.loads(done.stdout), output=output)

    def whoami(self, url: str, credential: str, home: Path) -> Answer:
        answer = self.command(url, credential, home, "user", "whoami")
        if answer.error_code is None and answer.result:
            answer.result = answer.result[0]["User"]["UserName"]
        return answer

    def search(self, url: str, credential: str, username: str, home: Path) -> Answer:
        answer = self.command(url, credential, home, "user", "search", "--usernames", username)
        if answer.error_code is None and answer.result is not None:
            answer.result = [u["User"]["Username"] for u in answer.result]
        return answer

    def forbidden(self, url: str, credential: str, home: Path) -> Answer:
        # `maniphest search` calls maniphest.search (after two lookups it may do without).
        return self.command(url, credential, home, "maniphest", "search", "anything")


CLIENT_TYPES: dict[str, Callable[[], Client]] = {
    "arc": Arc,
    "phabricator": PhabricatorPackage,
    "phabfive": Phabfive,
    "canduit": Canduit,
}


@pytest.mark.parametrize("name", list(CLIENT_TYPES))
def test_client_through_the_gateway(stack: Stack, name: str, tmp_path: Path) -> None:
    driver = CLIENT_TYPES[name]()
    home = tmp_path / "home"
    home.mkdir()
    pod = stack.pod(f"{name}-runner")
    # phabfive takes only a Phorge-shaped token: ask for that format explicitly.
    extra = ["--format", "phorge-token"] if driver.phorge_token else []
    credential = stack.credential(pod, tmp_path, *extra)
    url = stack.gateway_url

    me = driver.whoami(url, credential, home)
    assert me.error_code is None and me.result == stack.bot, f"user.whoami by {name}: {me}"

    found = driver.search(url, credential, stack.bot, home)
    assert found.error_code is None and found.result == [stack.bot], f"user.search: {found}"

    refused = driver.forbidden(url, credential, home)
    assert refused.error_code == "ERR-CONDUIT-CORE", f"{FORBIDDEN} by {name}: {refused}"
    assert "not allowed by PhabricatorBinding" in refused.error, refused

    stack.cluster.core.delete_namespaced_pod(pod.metadata.name, NS, grace_period_seconds=0)
    wait_for(lambda: stack.refusal(credential) == "ERR-INVALID-AUTH", what="the revocation")
    revoked = driver.whoami(url, credential, home)
    assert revoked.result is None and driver.revoked_says in revoked.error, (
        f"user.whoami by {name} after the pod is gone: {revoked}"
    )
    echoed = credential in revoked.output
    assert not echoed, f"{name} printed the credential"


# What each client sends, as docs/clients.md says: recorded by a loopback server that answers
# as Phorge does (X-Conduit-Capabilities: gzip; the answer in gzip to a client that accepts it).

SENDS: dict[str, dict[str, Any]] = {
    "arc": {
        "accept": "*/*",
        "accept-encoding": "gzip",
        "user-agent": None,
        "fields": ["params", "output", "__conduit__"],
    },
    "phabricator": {
        "accept": "*/*",
        "accept-encoding": "gzip, deflate",
        "user-agent": "python-phabricator/1",
        "fields": ["params", "output"],
    },
    "phabfive": {
        "accept": "*/*",
        "accept-encoding": "gzip, deflate",
        "user-agent": "python-phabricator/1",
        "fields": ["params", "output"],
    },
    "canduit": {
        "accept": "application/json",
        "accept-encoding": None,
        "user-agent": None,
        "fields": ["output", "params"],
    },
}


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """Records each request; answers `conduit.query` and `user.whoami` as Phorge would."""

    def __init__(self, bot: str) -> None:
        self.bot = bot
        self.requests: list[Recorded] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorded = Recorded(self.command, self.path, headers, self.rfile.read(length))
                recorder.requests.append(recorded)
                body = json.dumps(recorder.envelope(self.path.rsplit("/", 1)[-1])).encode()
                compress = "gzip" in headers.get("accept-encoding", "")
                if compress:
                    body = gzip.compress(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Conduit-Capabilities", "gzip")
                if compress:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def envelope(self, method: str) -> dict[str, Any]:
        if method == "conduit.query":
            return {"result": conduit_server.METHODS, "error_code": None, "error_info": None}
        if method == "user.whoami":
            me = {"phid": "PHID-USER-aaaaaaaaaaaaaaaaaaaa", "userName": self.bot}
            me.update(realName=self.bot, primaryEmail="", roles=["bot", "verified"])
            return {"result": me, "error_code": None, "error_info": None}
        info = f'Conduit API method "{method}" does not exist.'
        return {"result": None, "error_code": "ERR-CONDUIT-CALL", "error_info": info}

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("name", list(CLIENT_TYPES))
def test_what_each_client_sends_and_reads(name: str, tmp_path: Path) -> None:
    driver = CLIENT_TYPES[name]()
    token = "api-" + "k" * 28  # Phorge's shape, which every client takes
    with Recorder("ci-bot") as recorder:
        me = driver.whoami(recorder.url, token, tmp_path)
    # It read the answer, compressed in gzip since it asked for that.
    assert me.error_code is None and me.result == "ci-bot", f"{name}: {me}"
    paths = [r.path for r in recorder.requests]
    if name == "phabfive":  # the method list first, then whoami to verify, then whoami
        assert paths == ["/api/conduit.query", "/api/user.whoami", "/api/user.whoami"]
    else:
        assert paths == ["/api/user.whoami"]
    sends = SENDS[name]
    for request in recorder.requests:
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert "content-encoding" not in request.headers  # a first call is never compressed
        for header in ("accept", "accept-encoding", "user-agent"):
            assert request.headers.get(header) == sends[header], (name, header)
        fields = parse_qsl(request.body.decode(), keep_blank_values=True, strict_parsing=True)
        assert [key for key, _ in fields] == sends["fields"], name
        params = json.loads(dict(fields)["params"])
        assert params["__conduit__"] == {"token": token}, name  # never api.token
        assert dict(fields)["output"] == "json"
