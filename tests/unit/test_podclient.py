"""The pod-side client: exchange over a real socket, refresh timing, atomic writes."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from phabmesh.pod import client as podclient
from tests.unit.conftest import FakeEndpoint

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_exchange_sends_the_token_and_reads_the_credential(endpoint: str) -> None:
    FakeEndpoint.answers.append(
        (
            200,
            {
                "credential": "c.r.d",
                "expiresAt": "2026-01-01T00:15:00Z",
                "identity": "i",
                "binding": "b",
                "bot": "ci-bot",
            },
        )
    )
    credential = podclient.exchange(endpoint, "sa-token", binding="b")
    assert credential.token == "c.r.d"
    assert credential.expires_at == NOW + datetime.timedelta(minutes=15)
    assert FakeEndpoint.seen == [{"auth": "Bearer sa-token", "path": "/v1/credentials?binding=b"}]
    assert "c.r.d" not in repr(credential)


def test_exchange_asks_for_a_format_and_reads_which_it_got(endpoint: str) -> None:
    token = "api-" + "abcdefghijklmnopqrstuvwxyz23"
    FakeEndpoint.answers.append(
        (
            200,
            {
                "credential": token,
                "format": "phorge-token",
                "expiresAt": "2026-01-01T00:15:00Z",
                "identity": "i",
                "binding": "b",
                "bot": "ci-bot",
            },
        )
    )
    credential = podclient.exchange(endpoint, "sa-token", credential_format="phorge-token")
    assert (credential.token, credential.format) == (token, "phorge-token")
    assert FakeEndpoint.seen[0]["path"] == "/v1/credentials?format=phorge-token"
    assert token not in repr(credential)


@pytest.mark.parametrize(
    ("status", "retryable"), [(401, False), (403, True), (409, False), (503, True)]
)
def test_refusals_carry_the_endpoints_message(endpoint: str, status: int, retryable: bool) -> None:
    FakeEndpoint.answers.append((status, {"error": "no_lease", "message": "the pod is not meshed"}))
    with pytest.raises(podclient.ExchangeError, match="the pod is not meshed") as refused:
        podclient.exchange(endpoint, "sa-token")
    assert refused.value.status == status
    assert refused.value.retryable is retryable


def test_a_refusal_carries_the_endpoints_retry_after(endpoint: str) -> None:
    FakeEndpoint.answers.append((429, {"error": "rate_limited", "message": "slow down"}))
    FakeEndpoint.extra_headers = {"Retry-After": "7"}
    with pytest.raises(podclient.ExchangeError) as refused:
        podclient.exchange(endpoint, "sa-token")
    assert (refused.value.retryable, refused.value.retry_after) == (True, 7.0)


def _in_turn(outcomes: list[object]) -> Callable[[], podclient.Credential]:
    """A fetch that gives each of ``outcomes`` in turn, raising the errors among them."""

    def fetch() -> podclient.Credential:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, podclient.Credential)
        return outcome

    return fetch


def test_watch_waits_what_the_endpoint_asks() -> None:
    outcomes: list[object] = [podclient.ExchangeError("busy", retry_after=7.0), _credential(15)]
    sleeps: list[float] = []

    fetch = _in_turn(outcomes)

    podclient.watch(fetch, lambda _: None, stop=lambda: not outcomes, sleep=sleeps.append,
                    now=lambda: NOW)  # fmt: skip
    assert sleeps[0] == 7.0


def test_unreachable_endpoint_is_retryable_and_named_with_where_it_came_from() -> None:
    with pytest.raises(podclient.ExchangeError, match="unreachable") as refused:
        podclient.exchange(
            "http://127.0.0.1:9", "sa-token", timeout=2, source="from PHABMESH_CREDENTIAL_ENDPOINT"
        )
    assert refused.value.retryable
    message = str(refused.value)
    assert "http://127.0.0.1:9 (from PHABMESH_CREDENTIAL_ENDPOINT)" in message, message
    assert message.endswith("Connection refused"), message
    assert "sa-token" not in message


def test_the_credential_command_says_when_the_endpoint_is_only_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from phabmesh import cli

    # The command configures logging for its process: here, for this test only.
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    monkeypatch.setattr(cli.logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("PHABMESH_CREDENTIAL_ENDPOINT", raising=False)
    monkeypatch.setattr(podclient, "DEFAULT_ENDPOINT", "http://127.0.0.1:9")
    token = tmp_path / "token"
    token.write_text("sa-token")
    out = str(tmp_path / "credential")
    assert cli.main(["credential", "--token-file", str(token), "--output", out]) == 1
    said = capsys.readouterr().err
    assert "http://127.0.0.1:9 (the default: PHABMESH_CREDENTIAL_ENDPOINT is not set)" in said


def _credential(minutes: float) -> podclient.Credential:
    return podclient.Credential("t", NOW + datetime.timedelta(minutes=minutes), "i", "b", "bot")


def test_refresh_happens_well_before_expiry() -> None:
    assert podclient.refresh_delay(_credential(15), NOW) == 600.0  # two thirds of 15 min
    assert podclient.refresh_delay(_credential(1), NOW) == 30.0  # never later than 30 s before
    assert podclient.refresh_delay(_credential(0), NOW) == 1.0


def test_watch_backs_off_on_failure_then_refreshes() -> None:
    outcomes: list[object] = [
        podclient.ExchangeError("down"),
        podclient.ExchangeError("down"),
        _credential(15),
        _credential(15),
    ]
    stored: list[podclient.Credential] = []
    sleeps: list[float] = []

    fetch = _in_turn(outcomes)

    podclient.watch(
        fetch,
        stored.append,
        stop=lambda: not outcomes,
        sleep=sleeps.append,
        now=lambda: NOW,
    )
    assert len(stored) == 2
    assert 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4  # jittered, doubling
    assert sleeps[2:] == [600.0, 600.0]


def test_credential_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "run" / "credential"
    podclient.write_atomically(target, "one\n")
    podclient.write_atomically(target, "two\n")
    assert target.read_text() == "two\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["credential"]
