import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from phabmesh import logs

CONDUIT_TOKEN = "api-" + "q7v3xk2m9w4z8p1n6r5t0y3u2b7c"
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def test_secret_shaped_text_is_masked() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----"
    text = f"refused {CONDUIT_TOKEN} and {JWT} with {pem}"
    masked = logs.redact_text(text)
    assert CONDUIT_TOKEN not in masked
    assert JWT not in masked
    assert "abc" not in masked
    assert masked.count(logs.REDACTED) == 3


def test_secret_keys_are_dropped_wherever_they_nest() -> None:
    event = logs.redact(
        None,
        "info",
        {"event": "x", "token": "anything", "request": {"headers": {"Authorization": "Bearer y"}}},
    )
    assert event["token"] == logs.REDACTED
    assert event["request"]["headers"]["Authorization"] == logs.REDACTED


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("DEBUG", json_output=True, stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_stdlib_and_structlog_lines_are_json_and_redacted(json_logs: io.StringIO) -> None:
    structlog.get_logger("phabmesh.test").info("lease_issued", pod="p", credential=JWT)
    logging.getLogger("kopf.test").warning("saw %s", CONDUIT_TOKEN)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["lease_issued", f"saw {logs.REDACTED}"]
    assert lines[0]["pod"] == "p"
    assert lines[0]["credential"] == logs.REDACTED
    assert lines[1]["level"] == "warning"


def test_a_private_key_without_its_end_line_is_still_masked() -> None:
    cut = "key: -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB5k\n"
    assert logs.redact_text(cut) == f"key: {logs.REDACTED}"
    two = "a -----BEGIN PRIVATE KEY-----x-----END PRIVATE KEY----- b " * 2
    assert logs.redact_text(two) == f"a {logs.REDACTED} b " * 2


@pytest.mark.timeout(60)  # a guard only: the quadratic scans took minutes on each of these
@pytest.mark.parametrize(
    ("flood", "masked"),
    [
        ("-----BEGIN PRIVATE KEY-----" * 40_000, logs.REDACTED),  # 1 MiB
        ("eyJ" * 350_000, "eyJ" * 350_000),
        ("eyJa." * 200_000, logs.REDACTED),
        ("api-" * 260_000, f"{logs.REDACTED}-" * 130_000),  # token-shaped, of any length
        ("xapi-" * 210_000, "xapi-" * 210_000),
        ("api-" + "a" * 27 + "-", logs.REDACTED + "-"),
        ("-----BEGIN " * 95_000, "-----BEGIN " * 95_000),
    ],
)
def test_hostile_text_is_redacted_in_one_pass(flood: str, masked: str) -> None:
    assert logs.redact_text(flood) == masked


def test_long_values_are_clipped_and_never_end_in_part_of_a_token(
    json_logs: io.StringIO,
) -> None:
    filler = "x " * (logs.MAX_VALUE_CHARS // 2 - 10)
    structlog.get_logger("phabmesh.test").info(
        "conduit_call", error_info=filler + CONDUIT_TOKEN + " tail" * 100_000
    )
    line = json.loads(json_logs.getvalue())
    info = line["error_info"]
    assert len(info) < logs.MAX_VALUE_CHARS + 50
    assert info.endswith("more characters]")
    assert "api-" not in info and "q7v3" not in info  # the token's start is not left at the cut
    assert logs.clip("short") == "short"


# One redaction for log lines and for Phabricator's error messages passed on to callers.
PHORGE_ERRORS = [
    # Phorge echoes a token of any length, in any case, when it refuses it.
    'API token "api-short" has the wrong length. API tokens should be 32 characters long.',
    'API token "api-Q7V3XK2M9W4Z8P1N6R5T0Y3U2B7CEXTRA" is not valid.',
    'Conduit token "cli-abc123" is unknown.',
    'Cluster token "clr-' + "z" * 40 + '" has expired.',
]


@pytest.mark.parametrize("message", PHORGE_ERRORS)
def test_tokens_of_any_length_are_masked(message: str) -> None:
    token = message.split('"')[1]
    masked = logs.redact_text(message)
    assert token not in masked
    assert masked.count(logs.REDACTED) == 1
    assert masked.replace(logs.REDACTED, token) == message  # nothing else masked


def test_a_whole_token_is_masked_even_glued_to_a_word() -> None:
    assert logs.redact_text(f"token{CONDUIT_TOKEN}.") == f"token{logs.REDACTED}."


def test_the_secrets_a_caller_knows_are_masked_whatever_their_shape() -> None:
    message = 'Session key "hunter2" is not valid for user "bot"; jwt ' + JWT
    masked = logs.redact_text(message, "hunter2", None, "")
    assert "hunter2" not in masked and JWT not in masked
    assert (
        masked == f'Session key "{logs.REDACTED}" is not valid for user "bot"; jwt {logs.REDACTED}'
    )


def test_text_without_secrets_is_left_as_it_is() -> None:
    plain = "api: 3 calls; the apiserver said api - fine; l5d-client-id ns/sa; /api/user.whoami"
    assert logs.redact_text(plain) == plain


def test_plain_values_skip_the_token_scans_and_secrets_are_still_masked(
    json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit line's values (names, namespaces, a decision) are scanned for a token only
    when one could be there: the per-call CPU of the gateway's audit line."""
    scans: list[str] = []
    full = logs._mask_private_keys

    def counted(text: str) -> str:
        scans.append(text)
        return full(text)

    monkeypatch.setattr(logs, "_mask_private_keys", counted)
    audit = {"method": "user.whoami", "namespace": "team", "bot": "ci", "decision": "allowed"}
    structlog.get_logger("phabmesh.audit").info("conduit_call", latency_ms=1.2, **audit)
    assert scans == []
    line = json.loads(json_logs.getvalue())
    assert {k: line[k] for k in audit} == audit
    for secret in (CONDUIT_TOKEN, JWT, "cli-" + "x" * 28, "clr-abc", "-----BEGIN PRIVATE KEY-----"):
        assert secret not in logs.redact_text(f"echoed {secret} back")
    assert len(scans) == 5


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        "a-b-c",
        "api",
        "eyJ",
        "x.eyJ.y.z",
        "-----BEGIN ",
        "api-",
        "xcli-y",
        "clr-",
        "A-pi-",
    ],
)
def test_the_scan_skip_changes_no_output(text: str) -> None:
    """Every text the quick check passes on unscanned is one the maskers leave as it is."""
    masked = logs._mask_jwts(logs._CONDUIT_TOKEN.sub(logs.REDACTED, logs._mask_private_keys(text)))
    assert logs.redact_text(text) == masked
    for suffix in ("", " tail", "-" * 5):
        whole = text + suffix
        assert logs.redact_text(whole) == logs._mask_jwts(
            logs._CONDUIT_TOKEN.sub(logs.REDACTED, logs._mask_private_keys(whole))
        )
