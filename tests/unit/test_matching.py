import pytest
from hypothesis import given
from hypothesis import strategies as st

from phabmesh import identity, matching, resources

N = identity.DEFAULT_NAMING
SUFFIX = "serviceaccount.identity.linkerd.cluster.local"


def spec(**kw: object) -> resources.BindingSpec:
    body: dict[str, object] = {"botRef": {"name": "b"}, "allowedMethods": ["user.whoami"]}
    body.update(kw)
    return resources.BindingSpec.model_validate(body)


def pod(
    sa: str = "ci", ns: str = "build", labels: dict[str, str] | None = None
) -> identity.PodFacts:
    return identity.PodFacts.from_pod(
        {
            "metadata": {"name": "p", "namespace": ns, "uid": "u", "labels": labels or {}},
            "spec": {"serviceAccountName": sa},
            "status": {"phase": "Running"},
        }
    )


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        (f"ci.build.{SUFFIX}", True),
        (f"cd.build.{SUFFIX}", False),
        ("*", True),
        (f"*.build.{SUFFIX}", True),
        (f"*.other.{SUFFIX}", False),
        (f"*.{SUFFIX}", True),
        ("spiffe://cluster.local/ns/build/sa/ci", True),
        ("spiffe://cluster.local/ns/build/sa/cd", False),
        ("spiffe://other.domain/ns/build/sa/ci", False),
    ],
)
def test_identities_follow_linkerd(pattern: str, matched: bool) -> None:
    assert matching.matches(spec(identities=[pattern]), "build", pod(), N) is matched


@given(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True))
def test_suffix_wildcard_needs_a_label_in_place_of_the_star(label: str) -> None:
    assert matching.identity_matches("*.x.y", f"{label}.x.y", N)
    assert not matching.identity_matches("*.x.y", "x.y", N)
    assert not matching.identity_matches("*.x.y", f"{label}x.y", N)


def test_identity_refs() -> None:
    sa_ref = spec(identityRefs=[{"kind": "ServiceAccount", "name": "ci"}])
    assert matching.matches(sa_ref, "build", pod(), N)
    assert not matching.matches(sa_ref, "build", pod(sa="other"), N)
    any_sa = spec(identityRefs=[{"kind": "ServiceAccount", "name": "*"}])
    assert matching.matches(any_sa, "build", pod(sa="other"), N)
    ns_ref = spec(identityRefs=[{"kind": "Namespace", "name": "build"}])
    assert matching.matches(ns_ref, "build", pod(sa="anything"), N)


def test_a_binding_never_matches_another_namespace() -> None:
    everyone = spec(identities=["*"])
    assert not matching.matches(everyone, "build", pod(ns="prod"), N)


def test_pod_selector_narrows() -> None:
    selective = spec(
        identities=["*"],
        podSelector={
            "matchLabels": {"app": "runner"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["ci", "cd"]},
                {"key": "debug", "operator": "DoesNotExist"},
            ],
        },
    )
    assert matching.matches(selective, "build", pod(labels={"app": "runner", "tier": "ci"}), N)
    assert not matching.matches(selective, "build", pod(labels={"app": "runner"}), N)
    assert not matching.matches(
        selective, "build", pod(labels={"app": "runner", "tier": "ci", "debug": "1"}), N
    )


@pytest.mark.parametrize(
    ("operator", "values", "labels", "expected"),
    [
        ("In", ["a"], {"k": "a"}, True),
        ("In", ["a"], {}, False),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("NotIn", ["a"], {}, True),
        ("Exists", [], {"k": ""}, True),
        ("Exists", [], {}, False),
        ("DoesNotExist", [], {}, True),
    ],
)
def test_selector_operators(
    operator: str, values: list[str], labels: dict[str, str], expected: bool
) -> None:
    selector = resources.LabelSelector.model_validate(
        {"matchExpressions": [{"key": "k", "operator": operator, "values": values}]}
    )
    assert matching.selector_matches(selector, labels) is expected


def test_subject_problems_name_the_field() -> None:
    problems = matching.validate_subjects(
        spec(
            identities=[f"ci.prod.{SUFFIX}", "a*b", "spiffe://x/ns"],
            identityRefs=[{"kind": "Namespace", "name": "prod"}],
        ),
        "build",
    )
    assert [p.split(":")[0] for p in problems] == [
        "spec.identities[0]",
        "spec.identities[1]",
        "spec.identities[2]",
        "spec.identityRefs[0].name",
    ]
    assert matching.validate_subjects(spec(identities=["*", f"*.build.{SUFFIX}"]), "build") == []


@pytest.mark.parametrize(
    ("method", "globs", "allowed"),
    [
        ("user.whoami", ["user.whoami"], True),
        ("user.search", ["user.*"], True),
        ("differential.revision.search", ["differential.*"], True),
        ("maniphest.edit", ["differential.*", "user.*"], False),
        ("user.whoami", ["*"], True),
        ("User.whoami", ["user.*"], False),
        ("../user.whoami", ["*"], False),
        ("user.whoami/x", ["*"], False),
    ],
)
def test_method_allowlist(method: str, globs: list[str], allowed: bool) -> None:
    assert matching.method_allowed(method, globs) is allowed
