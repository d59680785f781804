import re

import pytest

from phabmesh.settings import Settings, parse_seconds


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


def test_the_settings_document_lists_every_setting() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    for var, _, default in Settings.documented():
        assert f"| `{var}` | `{default}` |" in text, var


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PHABMESH_KUBE_QPS", "5m", "PHABMESH_KUBE_QPS: not a rate: '5m' (requests per second"),
        ("PHABMESH_LOG_JSON", "ture", "PHABMESH_LOG_JSON: not a boolean: 'ture' (use true or"),
        ("PHABMESH_REQUIRE_CLIENT_ID", "maybe", "PHABMESH_REQUIRE_CLIENT_ID: not a boolean"),
        ("PHABMESH_CLOCK_SKEW", "-5", "PHABMESH_CLOCK_SKEW: not a number of 0 or more: '-5'"),
        ("PHABMESH_CLOCK_SKEW", "5 minutes", "PHABMESH_CLOCK_SKEW: not a duration"),
        ("PHABMESH_KUBE_BURST", "-1", "PHABMESH_KUBE_BURST: not a whole number of 0 or more"),
        ("PHABMESH_KUBE_BURST", "1.5", "PHABMESH_KUBE_BURST: invalid literal"),
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
