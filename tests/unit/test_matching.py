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
    sa: str = "ci",
    ns: str = "build",
    labels: dict[str, str] | None = None,
    *,
    phase: str = "Running",
    meshed: bool = True,
    terminating: bool = False,
) -> identity.PodFacts:
    meta: dict[str, object] = {"name": "p", "namespace": ns, "uid": "u", "labels": labels or {}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    containers = [{"name": "app"}] + ([{"name": "linkerd-proxy"}] if meshed else [])
    return identity.PodFacts.from_pod(
        {
            "metadata": meta,
            "spec": {"serviceAccountName": sa, "containers": containers},
            "status": {"phase": phase},
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
        ("spiffe://cluster.local/ns/build/sa/*", False),  # no wildcards in the SPIFFE spelling
        (f"*.*.{SUFFIX}", False),  # Linkerd reads an inner '*' literally
        (f"c*.build.{SUFFIX}", False),
        (f"**.build.{SUFFIX}", False),
        ("*.", False),
        (f"*.ci.build.{SUFFIX}", False),
        ("*.cluster.local", True),
        (f"*.d.{SUFFIX}", False),  # suffix match is on whole labels: 'build' does not end '.d'
    ],
)
def test_identities_follow_linkerd(pattern: str, matched: bool) -> None:
    assert matching.matches(spec(identities=[pattern]), "build", pod(), N) is matched


@given(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True))
def test_suffix_wildcard_needs_a_label_in_place_of_the_star(label: str) -> None:
    assert matching.identity_matches("*.x.y", f"{label}.x.y", N)
    assert not matching.identity_matches("*.x.y", "x.y", N)
    assert not matching.identity_matches("*.x.y", f"{label}x.y", N)


@given(
    sa=st.from_regex(r"[a-z]{1,5}(\.[a-z]{1,5}){0,2}", fullmatch=True),
    cut=st.integers(0, 8),
)
def test_suffix_wildcards_behave_like_linkerds_proxy(sa: str, cut: int) -> None:
    # Linkerd: "*.a.b" becomes Suffix(["a", "b"]), and the proxy checks name.ends_with(".a.b").
    name = identity.linkerd_identity(sa, "build")
    labels = name.split(".")
    rest = labels[min(cut, len(labels) - 1) :]
    pattern = "*." + ".".join(rest)
    assert matching.identity_matches(pattern, name) is name.endswith("." + ".".join(rest))
    assert matching.identity_matches(pattern, name) is (len(rest) < len(labels))


def test_identity_refs() -> None:
    sa_ref = spec(identityRefs=[{"kind": "ServiceAccount", "name": "ci"}])
    assert matching.matches(sa_ref, "build", pod(), N)
    assert not matching.matches(sa_ref, "build", pod(sa="other"), N)
    any_sa = spec(identityRefs=[{"kind": "ServiceAccount", "name": "*"}])
    assert matching.matches(any_sa, "build", pod(sa="other"), N)
    ns_ref = spec(identityRefs=[{"kind": "Namespace", "name": "build"}])
    assert matching.matches(ns_ref, "build", pod(sa="anything"), N)
    other_ns = spec(identityRefs=[{"kind": "Namespace", "name": "prod"}])
    assert not matching.matches(other_ns, "build", pod(), N)
    explicit = spec(identityRefs=[{"kind": "ServiceAccount", "name": "ci", "namespace": "build"}])
    assert matching.matches(explicit, "build", pod(), N)
    elsewhere = spec(identityRefs=[{"kind": "ServiceAccount", "name": "ci", "namespace": "prod"}])
    assert not matching.matches(elsewhere, "build", pod(), N)


def test_a_custom_control_plane_and_trust_domain() -> None:
    naming = identity.Naming("l5d", "example.org")
    listed = spec(identities=["ci.build.serviceaccount.identity.l5d.example.org"])
    assert matching.matches(listed, "build", pod(), naming)
    assert not matching.matches(listed, "build", pod(), N)
    spiffe = spec(identities=["spiffe://example.org/ns/build/sa/ci"])
    assert matching.matches(spiffe, "build", pod(), naming)
    assert not matching.matches(spiffe, "build", pod(), N)


@pytest.mark.parametrize(
    ("the_pod", "subjects", "reason"),
    [
        (pod(), {"identities": ["*"]}, matching.MATCHED),
        (pod(ns="prod"), {"identities": ["*"]}, matching.OTHER_NAMESPACE),
        (
            pod(sa="cd"),
            {"identityRefs": [{"kind": "ServiceAccount", "name": "ci"}]},
            matching.IDENTITY_NOT_LISTED,
        ),
        (
            pod(),
            {"identities": ["*"], "podSelector": {"matchLabels": {"app": "x"}}},
            matching.SELECTOR_MISMATCH,
        ),
        # Selection only: the pod's state is phabmesh.leases.plans' (test_decide.py).
        (pod(terminating=True), {"identities": ["*"]}, matching.MATCHED),
        (pod(phase="Pending", meshed=False), {"identities": ["*"]}, matching.MATCHED),
        (
            pod(sa="cd", meshed=False),
            {"identities": [f"ci.build.{SUFFIX}"]},
            matching.IDENTITY_NOT_LISTED,
        ),
    ],
)
def test_selections_say_why(
    the_pod: identity.PodFacts, subjects: dict[str, object], reason: str
) -> None:
    selected = matching.select(spec(**subjects), "build", the_pod, N)
    assert selected.reason == reason
    assert selected.matched is (reason == matching.MATCHED)
    assert bool(selected) is selected.matched
    assert matching.matches(spec(**subjects), "build", the_pod, N) is selected.matched


def test_selections_are_shared_values() -> None:
    a = matching.select(spec(identities=["*"]), "build", pod(), N)
    b = matching.select(spec(identities=["*"]), "build", pod(), N)
    assert a is b
    assert a == matching.Decision(True, matching.MATCHED)


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
        ("DoesNotExist", [], {"k": "a"}, False),
        ("In", ["a", "b"], {"k": "b"}, True),
        ("NotIn", ["a", "b"], {"k": "c"}, True),
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
    ("subjects", "field"),
    [
        ({"identities": [f"*.*.{SUFFIX}"]}, "spec.identities[0]"),
        ({"identities": ["*."]}, "spec.identities[0]"),
        ({"identities": [f"*..{SUFFIX}"]}, "spec.identities[0]"),
        ({"identities": [f"*.prod.{SUFFIX}"]}, "spec.identities[0]"),
        ({"identities": ["ci.example.org"]}, "spec.identities[0]"),
        ({"identities": ["spiffe://cluster.local/ns/prod/sa/ci"]}, "spec.identities[0]"),
        ({"identities": ["spiffe://cluster.local/ns/build/sa/*"]}, "spec.identities[0]"),
        (
            {"identityRefs": [{"kind": "ServiceAccount", "name": "Bad_Name"}]},
            "spec.identityRefs[0].name",
        ),
        (
            {"identityRefs": [{"kind": "ServiceAccount", "name": "ci", "namespace": "prod"}]},
            "spec.identityRefs[0].namespace",
        ),
        (
            {
                "identities": ["*"],
                "podSelector": {"matchExpressions": [{"key": "k", "operator": "In", "values": []}]},
            },
            "spec.podSelector.matchExpressions[0].values",
        ),
        (
            {
                "identities": ["*"],
                "podSelector": {
                    "matchExpressions": [{"key": "k", "operator": "Exists", "values": ["a"]}]
                },
            },
            "spec.podSelector.matchExpressions[0].values",
        ),
    ],
)
def test_each_problem_names_its_field(subjects: dict[str, object], field: str) -> None:
    problems = matching.validate_subjects(spec(**subjects), "build")
    assert len(problems) == 1, problems
    assert problems[0].startswith(field + ": ")


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        f"*.build.{SUFFIX}",
        f"*.{SUFFIX}",
        "*.cluster.local",
        f"*.runner.build.{SUFFIX}",  # a dotted service account name such as "deploy.runner"
        f"ci.build.{SUFFIX}",
        f"deploy.bot.build.{SUFFIX}",
        "spiffe://cluster.local/ns/build/sa/ci",
    ],
)
def test_good_subjects_have_no_problems(pattern: str) -> None:
    assert matching.validate_subjects(spec(identities=[pattern]), "build", N) == []
    assert matching.validate_subjects(spec(identities=[pattern]), "build") == []


def test_with_naming_other_clusters_names_are_problems() -> None:
    naming = identity.Naming("l5d", "example.org")
    problems = matching.validate_subjects(
        spec(
            identities=[
                f"ci.build.{SUFFIX}",
                "spiffe://cluster.local/ns/build/sa/ci",
                f"*.build.{SUFFIX}",
                "ci.build.serviceaccount.identity.l5d.example.org",
            ]
        ),
        "build",
        naming,
    )
    assert [p.split(":")[0] for p in problems] == [
        "spec.identities[0]",
        "spec.identities[1]",
        "spec.identities[2]",
    ]
    assert "example.org" in problems[1]


def test_method_globs_that_match_nothing_are_problems() -> None:
    assert matching.validate_method_globs(["user.*", "differential.revision.search", "*"]) == []
    problems = matching.validate_method_globs(["user.*", "User.*", "a/b", ""])
    assert [p.split(":")[0] for p in problems] == [
        "spec.allowedMethods[1]",
        "spec.allowedMethods[2]",
        "spec.allowedMethods[3]",
    ]


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
        ("user.whoami", ["user.who?mi"], True),
        ("user.whoami", [""], False),
        ("user.whoami", [], False),
        ("", ["*"], False),
        ("user..whoami", ["*"], False),
        ("user.whoami ", ["*"], False),
        ("user.whoami", ["user.whoami "], False),
        ("user.whoami", ["USER.WHOAMI"], False),
        ("differential.revision.search", ["differential.revision.search"], True),
        ("differential.revision.edit", ["differential.revision.search"], False),
        ("user.whoami", ["user.[a-w]*"], True),
        ("a" * 200, ["*"], False),
    ],
)
def test_method_allowlist(method: str, globs: list[str], allowed: bool) -> None:
    assert matching.method_allowed(method, globs) is allowed


def test_the_glob_that_allows_a_method_is_named() -> None:
    globs = ["user.whoami", "user.*", "differential.*"]
    assert matching.allowing_glob("user.whoami", globs) == "user.whoami"
    assert matching.allowing_glob("user.search", globs) == "user.*"
    assert matching.allowing_glob("differential.revision.search", globs) == "differential.*"
    assert matching.allowing_glob("x" + "0" * 40, globs) is None
    assert matching.allowing_glob("User.whoami", ["*"]) is None


@pytest.mark.parametrize(
    "method",
    ["user.whoami\n", "user.whoami\r\n", "user.whoami\x00", "\nuser.whoami", "user.whoami\n\n"],
)
def test_method_names_are_matched_whole(method: str) -> None:
    """A trailing newline once passed the name check ("$" matches before it) and `user.*`."""
    assert not matching.is_method_name(method)
    assert matching.allowing_glob(method, ["user.*", "*"]) is None
    assert matching.validate_method_globs(["user.*\n"]) != []
