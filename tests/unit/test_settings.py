import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from phabmesh import settings
from phabmesh.settings import Settings, parse_seconds
from tests.stack import this_thread_only

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("1m30s", 90.0), ("1h", 3600.0), ("250ms", 0.25), ("1.5", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "1h 5m", "-", "5m1"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_seconds(text)


def test_environment_overrides_defaults() -> None:
    settings = Settings.from_env(
        {
            "PHABMESH_NAMESPACE": "mesh",
            "PHABMESH_BOT_RECHECK_INTERVAL": "2m",
            "PHABMESH_KUBE_BURST": "7",
            "PHABMESH_LOG_JSON": "true",
            "UNRELATED": "x",
        }
    )
    assert settings.namespace == "mesh"
    assert settings.bot_recheck_interval == 120.0
    assert settings.kube_burst == 7
    assert settings.log_json is True
    assert settings.trust_domain == "cluster.local"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"log_json": True, "peering_lifetime": 10.0, "kube_burst": 9}, {"log_json": False}],
)
def test_local_settings_survive_the_trip_through_the_environment(overrides: dict) -> None:
    env = Settings.local_env("http://127.0.0.1:1", **overrides)
    assert all(var.startswith("PHABMESH_") for var in env)
    assert Settings.from_env(env) == Settings.local("http://127.0.0.1:1", **overrides)


def test_local_env_refuses_an_unknown_setting() -> None:
    with pytest.raises(TypeError, match="no_such_setting"):
        Settings.local_env("http://127.0.0.1:1", no_such_setting=1)


def test_a_bad_value_names_its_variable() -> None:
    with pytest.raises(ValueError, match="PHABMESH_CLOCK_SKEW"):
        Settings.from_env({"PHABMESH_CLOCK_SKEW": "soon"})


def test_every_setting_is_documented_with_its_variable() -> None:
    documented = Settings.documented()
    assert ("PHABMESH_GATEWAY_PORT", "gateway_port", 8080) in documented
    assert all(var.startswith("PHABMESH_") for var, _, _ in documented)


def test_the_settings_document_is_the_one_the_model_gives() -> None:
    text = (REPO / "docs" / "settings.md").read_text()
    assert text == settings.document(), (
        "docs/settings.md is not the model's: run "
        "`PYTHONPATH=operator python -m phabmesh.settings docs/settings.md`"
    )
    for var, name, _ in Settings.documented():
        group = settings.GROUPS[Settings.group_of(name)]
        section = text.split(f"\n## {group}\n", 1)[1].split("\n## ", 1)[0]
        assert f"| `{var}` |" in section, var


def test_every_setting_has_a_group_and_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert Settings.group_of(name) in settings.GROUPS, name
        assert field.description and len(field.description) > 20, name
    groups = {Settings.group_of(name) for name in Settings.model_fields}
    assert groups == set(settings.GROUPS)  # no empty section


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PHABMESH_KUBE_QPS", "5m", "PHABMESH_KUBE_QPS: not a rate: '5m' (requests per second"),
        ("PHABMESH_LOG_JSON", "ture", "PHABMESH_LOG_JSON: not a boolean: 'ture' (use true, f"),
        ("PHABMESH_REQUIRE_CLIENT_ID", "maybe", "PHABMESH_REQUIRE_CLIENT_ID: not a boolean"),
        ("PHABMESH_CLOCK_SKEW", "-5", "PHABMESH_CLOCK_SKEW: not a number of 0 or more: '-5'"),
        ("PHABMESH_CLOCK_SKEW", "5 minutes", "PHABMESH_CLOCK_SKEW: not a duration"),
        ("PHABMESH_KUBE_BURST", "-1", "PHABMESH_KUBE_BURST: not a whole number of 0 or more"),
        ("PHABMESH_KUBE_BURST", "1.5", "PHABMESH_KUBE_BURST: not a whole number of 0 or more"),
        ("PHABMESH_TOKEN_REVIEW_QPS", "nan", "PHABMESH_TOKEN_REVIEW_QPS: not a number of 0"),
        (
            "PHABMESH_HOOKS_TARGET_URL",
            "http://{service}.{ns}:{port}",
            "PHABMESH_HOOKS_TARGET_URL: 'http://{service}.{ns}:{port}' may hold only",
        ),
        (
            "PHABMESH_HOOKS_TARGET_URL",
            "file:///{service}",
            "PHABMESH_HOOKS_TARGET_URL: 'file:///{service}' is not an http or https URL",
        ),
        ("PHABMESH_HOOKS_FRESHNESS", "0", "PHABMESH_HOOKS_FRESHNESS: must be more than 0"),
        ("PHABMESH_HOOKS_TIMEOUT", "0s", "PHABMESH_HOOKS_TIMEOUT: must be more than 0"),
        ("PHABMESH_HOOKS_MAX_CONCURRENT", "0", "PHABMESH_HOOKS_MAX_CONCURRENT: must be more"),
        ("PHABMESH_HOOKS_REPLAY_ENTRIES", "0", "PHABMESH_HOOKS_REPLAY_ENTRIES: must be 1 or"),
    ],
)
def test_a_wrong_setting_is_refused_naming_its_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env({variable: value})


def test_settings_read_their_documented_forms() -> None:
    read = Settings.from_env(
        {
            "PHABMESH_KUBE_QPS": "50",
            "PHABMESH_CLOCK_SKEW": "1m",
            "PHABMESH_WATCH_LIVENESS": "45",
            "PHABMESH_LOG_JSON": "auto",
            "PHABMESH_GATEWAY_WATCH_PODS": "Off",
            "PHABMESH_REQUIRE_CLIENT_ID": " yes ",
        }
    )
    assert (read.kube_qps, read.clock_skew, read.watch_liveness) == (50.0, 60.0, 45.0)
    assert read.log_json is None
    assert read.gateway_watch_pods is False and read.require_client_id is True


# Every class of bad input, from the environment: the message names the variable and says
# what the variable takes.
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        # a wrong type
        ("PHABMESH_GATEWAY_PORT", "http", "not a whole number of 0 or more: 'http'"),
        ("PHABMESH_WEBHOOK_MAX_CONCURRENT", "four", "not a whole number of 0 or more"),
        ("PHABMESH_KUBE_QPS", "fast", "not a rate: 'fast' (requests per second, e.g. 50)"),
        ("PHABMESH_LOG_LEVEL", "LOUD", "not a log level: 'LOUD' (use one of DEBUG, INFO"),
        # a negative number
        ("PHABMESH_GATEWAY_PORT", "-1", "not a whole number of 0 or more: '-1'"),
        ("PHABMESH_KUBE_QPS", "-3", "not a number of 0 or more: '-3'"),
        ("PHABMESH_WATCH_LIVENESS", "-30s", "not a duration: '-30s' (use e.g. 30s, 5m, 1h30m)"),
        ("PHABMESH_INJECTED_TOKEN_TTL", "-600", "not a number of 0 or more: '-600'"),
        # a duration with a wrong unit
        ("PHABMESH_BOT_RECHECK_INTERVAL", "5d", "not a duration: '5d' (use e.g. 30s, 5m"),
        ("PHABMESH_KEY_ROTATION_INTERVAL", "1w", "not a duration: '1w'"),
        ("PHABMESH_CONDUIT_TIMEOUT", "10 s", "not a duration: '10 s'"),
        # a rate given as a duration
        ("PHABMESH_KUBE_QPS", "5m", "not a rate: '5m' (requests per second"),
        ("PHABMESH_TOKEN_REVIEW_SOURCE_QPS", "1s", "not a rate: '1s'"),
        # a misspelt boolean
        ("PHABMESH_LOG_JSON", "ture", "not a boolean: 'ture' (use true, false or auto)"),
        ("PHABMESH_GATEWAY_WATCH_PODS", "flase", "not a boolean: 'flase' (use true or false)"),
        ("PHABMESH_GATEWAY_WATCH_PODS", "", "not a boolean: '' (use true or false)"),
        # the checks across fields
        ("PHABMESH_AGENT_LIMITS_MEMORY", "lots", "PHABMESH_AGENT_LIMITS_MEMORY"),
        ("PHABMESH_AGENT_REQUESTS_MEMORY", "1Gi", "PHABMESH_AGENT_REQUESTS_MEMORY"),
    ],
)
def test_each_class_of_bad_input_names_its_variable_and_what_it_takes(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)) as refused:
        Settings.from_env({variable: value})
    message = str(refused.value)
    assert variable in message
    assert "\n" not in message
    assert "pydantic" not in message and "errors.pydantic.dev" not in message


def test_several_bad_values_are_named_in_one_line() -> None:
    with pytest.raises(ValueError) as refused:
        Settings.from_env({"PHABMESH_KUBE_QPS": "5m", "PHABMESH_LOG_JSON": "ture"})
    message = str(refused.value)
    assert "PHABMESH_KUBE_QPS: not a rate" in message
    assert "PHABMESH_LOG_JSON: not a boolean" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"kube_burst": [1]}, "PHABMESH_KUBE_BURST: not a whole number: [1]"),
        ({"kube_burst": True}, "PHABMESH_KUBE_BURST: not a whole number: True"),
        ({"kube_burst": 2.5}, "PHABMESH_KUBE_BURST: not a whole number of 0 or more: 2.5"),
        ({"gateway_port": -1}, "PHABMESH_GATEWAY_PORT: not a whole number of 0 or more: -1"),
        ({"clock_skew": float("nan")}, "PHABMESH_CLOCK_SKEW: not a number of 0 or more: nan"),
        ({"kube_qps": "5m"}, "PHABMESH_KUBE_QPS: not a rate: '5m'"),
        ({"log_json": "ture"}, "PHABMESH_LOG_JSON: not a boolean: 'ture'"),
        ({"namespace": 5}, "PHABMESH_NAMESPACE: Input should be a valid string"),
        ({"hooks_timeout": 0}, "PHABMESH_HOOKS_TIMEOUT: must be more than 0"),
    ],
)
def test_bad_values_given_in_code_are_refused_alike(
    overrides: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        Settings(**overrides)
    with pytest.raises(ValueError, match=re.escape(expected)):
        Settings.from_env({}, **overrides)
    with pytest.raises(ValueError, match=re.escape(expected)):
        Settings().replace(**overrides)


def test_an_unknown_setting_is_refused_by_name() -> None:
    for make in (
        lambda: Settings(kube_qsp=5),
        lambda: Settings.from_env({}, kube_qsp=5),
        lambda: Settings.local("http://127.0.0.1:1", kube_qsp=5),
        lambda: Settings().replace(kube_qsp=5),
    ):
        with pytest.raises(TypeError, match="'kube_qsp' \\(PHABMESH_KUBE_QSP\\)"):
            make()


def test_settings_are_frozen_and_replace_makes_a_validated_copy() -> None:
    base = Settings()
    changed = base.replace(kube_qps="50", watch_liveness="1m")
    assert (changed.kube_qps, changed.watch_liveness) == (50.0, 60.0)
    assert base.kube_qps == 400.0
    assert changed.replace() == changed and changed != base
    with pytest.raises(ValueError, match="frozen"):
        base.kube_qps = 1.0  # type: ignore[misc]


def test_only_from_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHABMESH_KUBE_QPS", "7")
    monkeypatch.setenv("PHABMESH_LOG_JSON", "ture")  # would be refused if read
    assert Settings().kube_qps == 400.0
    assert Settings.local("http://127.0.0.1:1").kube_qps == 400.0
    monkeypatch.setenv("PHABMESH_LOG_JSON", "true")
    read = Settings.from_env()
    assert (read.kube_qps, read.log_json) == (7.0, True)
    assert Settings.from_env(kube_qps=9).kube_qps == 9.0  # overrides win over the environment


# Deprecated names: PHABMESH_ISSUER_HOST/PORT, now PHABMESH_ENDPOINT_HOST/PORT.
@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "_warned", set())


@pytest.mark.usefixtures("fresh_warnings")
def test_a_deprecated_name_is_read_and_warned_of_once_without_its_value() -> None:
    env = {"PHABMESH_ISSUER_PORT": "47123", "PHABMESH_ISSUER_HOST": "10.1.2.3"}
    read = Settings.from_env(env)
    assert (read.endpoint_host, read.endpoint_port) == ("10.1.2.3", 47123)
    with capture_logs(processors=[this_thread_only()]) as logged:
        assert settings.warn_deprecated(env) == [
            ("PHABMESH_ISSUER_HOST", "PHABMESH_ENDPOINT_HOST"),
            ("PHABMESH_ISSUER_PORT", "PHABMESH_ENDPOINT_PORT"),
        ]
        settings.warn_deprecated(env)  # once per process
    assert logged == [
        {
            "event": "setting_deprecated",
            "old": "PHABMESH_ISSUER_HOST",
            "new": "PHABMESH_ENDPOINT_HOST",
            "log_level": "warning",
        },
        {
            "event": "setting_deprecated",
            "old": "PHABMESH_ISSUER_PORT",
            "new": "PHABMESH_ENDPOINT_PORT",
            "log_level": "warning",
        },
    ]
    assert "47123" not in repr(logged) and "10.1.2.3" not in repr(logged)


@pytest.mark.usefixtures("fresh_warnings")
def test_the_new_name_alone_warns_of_nothing() -> None:
    env = {"PHABMESH_ENDPOINT_PORT": "8443"}
    with capture_logs(processors=[this_thread_only()]) as logged:
        assert settings.warn_deprecated(env) == []
    assert logged == []
    assert Settings.from_env(env).endpoint_port == 8443


def test_old_and_new_names_set_to_different_values_are_refused() -> None:
    env = {"PHABMESH_ISSUER_PORT": "8443", "PHABMESH_ENDPOINT_PORT": "9443"}
    with pytest.raises(ValueError) as refused:
        Settings.from_env(env)
    message = str(refused.value)
    assert "PHABMESH_ISSUER_PORT (deprecated) and PHABMESH_ENDPOINT_PORT" in message
    assert "set only PHABMESH_ENDPOINT_PORT" in message
    # The same value under both names is no conflict.
    for same in ("9443", " 9443", "09443"):
        env = {"PHABMESH_ISSUER_PORT": same, "PHABMESH_ENDPOINT_PORT": "9443"}
        assert Settings.from_env(env).endpoint_port == 9443
    with pytest.raises(ValueError, match="PHABMESH_ISSUER_HOST \\(deprecated\\) and"):
        Settings.from_env({"PHABMESH_ISSUER_HOST": "10.0.0.1", "PHABMESH_ENDPOINT_HOST": "::"})


def test_the_deprecated_names_are_documented() -> None:
    text = (REPO / "docs" / "settings.md").read_text()
    for old, name in settings.DEPRECATED.items():
        assert f"| `{old}` | `PHABMESH_{name.upper()}` |" in text
        assert name in Settings.model_fields


# The processes that read settings: one line naming the variable, exit 2, no traceback.
def _cli(tmp_path: Path, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "PHABMESH_"))}
    clean.update(HOME=str(tmp_path), PYTHONPATH=str(REPO / "operator"), **env)
    return subprocess.run(
        [sys.executable, "-m", "phabmesh.cli", command],
        env=clean,
        input="",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["operator", "gateway", "webhook"])
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("PHABMESH_KUBE_QPS", "5m", "PHABMESH_KUBE_QPS: not a rate: '5m' (requests per second"),
        ("PHABMESH_LOG_JSON", "ture", "PHABMESH_LOG_JSON: not a boolean: 'ture'"),
    ],
)
def test_a_process_refuses_a_bad_setting_in_one_line(
    command: str, variable: str, value: str, expected: str, tmp_path: Path
) -> None:
    done = _cli(tmp_path, command, **{variable: value})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"phabmesh {command}: {expected}"), line


def test_a_process_refuses_both_names_set_differently(tmp_path: Path) -> None:
    done = _cli(tmp_path, "operator", PHABMESH_ISSUER_PORT="8443", PHABMESH_ENDPOINT_PORT="9443")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("phabmesh operator: PHABMESH_ISSUER_PORT (deprecated) and ")


def test_a_process_warns_of_a_deprecated_name_at_start(tmp_path: Path) -> None:
    # No cluster here: the process stops right after start, having logged the warning.
    done = _cli(tmp_path, "gateway", PHABMESH_ISSUER_PORT="47123", PHABMESH_LOG_JSON="true")
    assert done.returncode == 2, done.stderr  # no cluster to connect to
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == "setting_deprecated"]
    assert [(e["old"], e["new"], e["level"]) for e in warned] == [
        ("PHABMESH_ISSUER_PORT", "PHABMESH_ENDPOINT_PORT", "warning")
    ]
    assert "47123" not in done.stderr
