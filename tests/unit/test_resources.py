import datetime
import shutil
from pathlib import Path

import pytest
import yaml

from phabmesh import resources, schemacheck

CRDS = Path(__file__).resolve().parents[2] / "crds"
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_crds_and_models_agree() -> None:
    assert schemacheck.check(CRDS) == []


def test_drift_is_reported_both_ways(tmp_path: Path) -> None:
    shutil.copytree(CRDS, tmp_path / "crds")
    path = tmp_path / "crds" / "phabricatorbindings.yaml"
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["extraField"] = {"type": "string"}
    del spec["properties"]["requireClientID"]
    spec["properties"]["credentialTTL"]["default"] = "10m"
    path.write_text(yaml.safe_dump(doc))
    problems = schemacheck.check(tmp_path / "crds")
    assert any("extraField: in the CRD" in p for p in problems)
    assert any("requireClientID: in BindingSpec, not in the CRD" in p for p in problems)
    assert any("credentialTTL: default '10m'" in p for p in problems)
    assert schemacheck.main([str(tmp_path / "crds")]) == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert resources.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "15", "15 m", "1d", "m15"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        resources.parse_duration(text)


def test_binding_spec_defaults_match_the_crd() -> None:
    spec = resources.BindingSpec.model_validate(
        {"botRef": {"name": "b"}, "identities": ["*"], "allowedMethods": ["user.whoami"]}
    )
    assert spec.ttl == datetime.timedelta(minutes=15)
    assert spec.require_client_id is False


def test_transition_time_moves_only_when_status_flips() -> None:
    ready = resources.Condition.new("Ready", "True", "Verified", "ok", 1)
    first = resources.set_condition([], ready, T0)
    later = T0 + datetime.timedelta(minutes=5)
    same = resources.set_condition(
        first, resources.Condition.new("Ready", "True", "Verified", "still ok", 2), later
    )
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert same[0].message == "still ok"
    assert same[0].observed_generation == 2
    flipped = resources.set_condition(
        same, resources.Condition.new("Ready", "False", "Disabled", "off", 2), later
    )
    assert flipped[0].last_transition_time == "2026-01-01T00:05:00Z"
    both = resources.set_condition(
        flipped, resources.Condition.new("BotReady", "False", "Disabled", "off", 2), later
    )
    assert [c.type for c in both] == ["BotReady", "Ready"]
