"""Typed models, durations, conditions, and the CRDs' own patterns (checked here, in Python)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from phabmesh import resources
from phabmesh.leases import reasons

CRDS = Path(__file__).resolve().parents[2] / "crds"
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _spec_schema(file: str) -> dict[str, Any]:
    doc = yaml.safe_load((CRDS / file).read_text())
    props: dict[str, Any] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    return props


def _pattern(file: str, *path: str) -> re.Pattern[str]:
    node: Any = _spec_schema(file)
    for part in path:
        node = node[part]
    # The API server's patterns are RE2; these use only syntax Python reads the same way.
    return re.compile(node["pattern"])


IDENTITY = _pattern("phabricatorbindings.yaml", "spec", "properties", "identities", "items")
METHOD = _pattern("phabricatorbindings.yaml", "spec", "properties", "allowedMethods", "items")


def _ttl_rules() -> list[str]:
    node = _spec_schema("phabricatorbindings.yaml")["spec"]["properties"]["credentialTTL"]
    return [str(rule["rule"]) for rule in node["x-kubernetes-validations"]]


def _rule_pattern(rule: str) -> re.Pattern[str]:
    """The regular expression a CEL ``self.matches("...")`` rule applies (RE2; these use only
    syntax Python reads the same way)."""
    found = re.search(r"matches\(\"([^\"]+)\"\)", rule)
    assert found is not None, rule
    return re.compile(found.group(1).replace("\\\\", "\\"))


# A rule, not a pattern: its message gives examples of durations, not a regular expression.
TTL = _rule_pattern(_ttl_rules()[0])


@pytest.mark.parametrize(
    "name",
    [
        "ci.build.serviceaccount.identity.linkerd.cluster.local",
        "*",
        "*.build.serviceaccount.identity.linkerd.cluster.local",
        "spiffe://cluster.local/ns/build/sa/ci",
        "spiffe://example.org/ns/a-b/sa/deploy.bot",
        "web",
    ],
)
def test_identity_pattern_admits(name: str) -> None:
    assert IDENTITY.match(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "CI.build.serviceaccount",
        "ci.*.serviceaccount",
        "**.build",
        "*.",
        "ci..build",
        "-ci.build",
        "spiffe://cluster.local/sa/ci",
        "spiffe://cluster.local/ns/build/sa/",
        "spiffe://cluster.local/ns/build/sa/ci/extra",
        "spiffe:///ns/build/sa/ci",
        "https://cluster.local/ns/build/sa/ci",
        "ci build",
    ],
)
def test_identity_pattern_refuses(name: str) -> None:
    assert not IDENTITY.match(name)


@pytest.mark.parametrize("glob", ["user.whoami", "differential.*", "*", "differential.revision.*"])
def test_method_pattern_admits(glob: str) -> None:
    assert METHOD.match(glob)


@pytest.mark.parametrize("glob", ["User.whoami", "user whoami", ".user", "user/whoami", ""])
def test_method_pattern_refuses(glob: str) -> None:
    assert not METHOD.match(glob)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), ("1.5h", 5400), ("1m30s", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert resources.parse_duration(text).total_seconds() == seconds
    assert TTL.match(text), "the CRD admits what the parser reads"


@pytest.mark.parametrize("text", ["", "15", "15 m", "1d", "m15", "-5m", "15m\n", "1us", "1.m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        resources.parse_duration(text)
    if not text.endswith("\n"):  # Python's $ matches before a final newline; RE2's does not
        assert not TTL.match(text)


def test_ttl_bounds_match_the_crd_rule() -> None:
    rule = _ttl_rules()[1]
    low, high = re.findall(r"duration\(\"([^\"]+)\"\)", rule)
    assert _rule_pattern(rule).pattern == TTL.pattern, "the range rule is guarded by the format's"
    assert resources.parse_duration(low) == resources.MIN_CREDENTIAL_TTL
    assert resources.parse_duration(high) == resources.MAX_CREDENTIAL_TTL


BINDING = {"botRef": {"name": "b"}, "identities": ["*"], "allowedMethods": ["user.whoami"]}


def test_binding_spec_defaults_match_the_crd() -> None:
    spec = resources.BindingSpec.model_validate(BINDING)
    assert spec.credential_ttl == "15m"
    assert spec.ttl == datetime.timedelta(minutes=15)
    assert spec.require_client_id is False
    assert spec.pod_selector is None
    assert spec.identity_refs == ()
    assert spec.credential_format == resources.PHORGE_TOKEN == "PhorgeToken"


@pytest.mark.parametrize("value", ["jwt", "PEM", ""])
def test_binding_spec_takes_only_the_crds_credential_formats(value: str) -> None:
    assert resources.BindingSpec.model_validate({**BINDING, "credentialFormat": "JWT"})
    with pytest.raises(pydantic.ValidationError, match="credentialFormat"):
        resources.BindingSpec.model_validate({**BINDING, "credentialFormat": value})


@pytest.mark.parametrize("ttl", ["30s", "25h", "soon"])
def test_binding_spec_refuses_what_the_crd_refuses(ttl: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="credentialTTL"):
        resources.BindingSpec.model_validate({**BINDING, "credentialTTL": ttl})


def test_bot_spec_parses_camel_case_and_round_trips() -> None:
    body = {
        "username": "ci-bot",
        "tokenSecretRef": {"name": "ci-bot-token"},
        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
    }
    spec = resources.BotSpec.model_validate(body)
    assert spec.token_secret_ref.key == "token"
    assert spec.namespace_selector.match_expressions[0].values == ()
    dumped = spec.model_dump(by_alias=True, mode="json")
    assert dumped["tokenSecretRef"] == {"name": "ci-bot-token", "key": "token"}
    assert resources.BotSpec.model_validate(dumped) == spec


def test_spec_models_refuse_unknown_fields_and_statuses_ignore_them() -> None:
    with pytest.raises(pydantic.ValidationError, match="botName"):
        resources.BindingSpec.model_validate({**BINDING, "botName": "b"})
    status = resources.LeaseStatus.model_validate(
        {"phase": "Active", "expiresAt": "2026-01-01T00:15:00Z", "future": 1}
    )
    assert status.phase == resources.ACTIVE
    assert status.expires_at == "2026-01-01T00:15:00Z"


def test_revocation_reasons_are_the_crds_and_the_controllers() -> None:
    doc = yaml.safe_load((CRDS / "phabricatorcredentials.yaml").read_text())
    reason = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"
    ]["reason"]
    documented = set(re.findall(r"[A-Z][A-Za-z]+", reason["description"])) - {"Why", "CamelCase"}
    assert documented == resources.REVOCATION_REASONS
    assert all(re.fullmatch(reason["pattern"], r) for r in resources.REVOCATION_REASONS)
    controller = {
        reasons.POD_TERMINATING,
        reasons.POD_SUCCEEDED,
        reasons.POD_FAILED,
        reasons.POD_DELETED,
        reasons.POD_GONE,
        reasons.NOT_RUNNING,
        reasons.NOT_MESHED,
        reasons.NO_LONGER_MATCHED,
        reasons.BINDING_DELETED,
        reasons.BINDING_NOT_READY,
        reasons.BOT_LOST,
        reasons.BOT_CHANGED,
        reasons.BOT_GONE_HERE,
        reasons.REVOKED_BY_ADMIN,
    }
    assert controller == resources.REVOCATION_REASONS


def test_transition_time_moves_only_when_status_flips() -> None:
    ready = resources.Condition.new(resources.READY, "True", "Verified", "ok", 1)
    first = resources.set_condition([], ready, T0)
    assert first[0].last_transition_time == "2026-01-01T00:00:00Z"
    later = T0 + datetime.timedelta(minutes=5)
    same = resources.set_condition(
        first, resources.Condition.new(resources.READY, "True", "Verified", "still ok", 2), later
    )
    assert same[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert same[0].message == "still ok"
    assert same[0].observed_generation == 2
    reason_only = resources.set_condition(
        same, resources.Condition.new(resources.READY, "True", "Reverified", "ok", 2), later
    )
    assert reason_only[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert reason_only[0].reason == "Reverified"
    flipped = resources.set_condition(
        reason_only, resources.Condition.new(resources.READY, "False", "Disabled", "off", 2), later
    )
    assert flipped[0].last_transition_time == "2026-01-01T00:05:00Z"
    both = resources.set_condition(
        flipped, resources.Condition.new(resources.BOT_READY, "False", "Disabled", "off", 2), later
    )
    assert [c.type for c in both] == [resources.BOT_READY, resources.READY]
    assert first[0].last_transition_time == "2026-01-01T00:00:00Z", "inputs are not changed"


def test_conditions_dump_in_the_crds_shape() -> None:
    conditions = resources.set_condition(
        [], resources.Condition.new(resources.READY, "Unknown", "PhabricatorUnavailable", "", 3), T0
    )
    assert [c.model_dump(by_alias=True, mode="json") for c in conditions] == [
        {
            "type": "Ready",
            "status": "Unknown",
            "reason": "PhabricatorUnavailable",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 3,
        }
    ]


def test_parse_conditions_keeps_the_well_formed() -> None:
    raw = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Verified",
            "message": "",
            "lastTransitionTime": "t",
        },
        {
            "type": "BotReady",
            "status": "Maybe",
            "reason": "X",
            "message": "",
            "lastTransitionTime": "t",
        },
        "junk",
    ]
    assert [c.type for c in resources.parse_conditions(raw)] == ["Ready"]
    assert resources.parse_conditions(None) == []


def test_a_label_value_cut_at_63_never_ends_in_a_separator() -> None:
    assert resources.label_value("a" * 62 + "-b") == "a" * 62
    assert resources.label_value("ci-bot") == "ci-bot"
    assert len(resources.label_value("x" * 300)) == 63
