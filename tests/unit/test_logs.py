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
