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
