"""Binding subjects and a pod: match?, label selectors, method allowlists. Pure: no I/O.

Subjects follow Linkerd's ``MeshTLSAuthentication`` as its policy controller and
proxy read them:

- ``identities``: ``*`` alone matches every identity; a pattern starting ``*.``
  matches every name ending in the rest *including its leading dot* (so
  ``*.build.serviceaccount.identity.linkerd.cluster.local`` matches
  ``ci.build...`` but not ``xbuild...``, and may stand for more than one label);
  anything else is an exact name, a ``*`` elsewhere being a literal character
  that never matches. A ``spiffe://<td>/ns/<ns>/sa/<sa>`` URI is another spelling
  of one exact DNS-form name (no wildcards in that spelling).
- ``identityRefs``: ``kind: ServiceAccount`` is that account's identity (namespace
  defaulting to the binding's); ``kind: Namespace`` is every ServiceAccount in it
  (Linkerd turns it into ``*.<ns>.serviceaccount.identity...``). phabmesh also
  reads the name ``*`` as "all" for either kind, as its CRD documents.

A binding only ever matches pods in its own namespace; ``podSelector`` narrows
the match further.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping

from phabmesh import identity, resources

# Selection reasons, CamelCase: whether a binding picks a pod, and if not, why. Whether a
# picked pod may hold a lease (its phase, its proxy) is phabmesh.leases.plans' question.
MATCHED = "Matched"  # the binding's namespace, subjects and selector pick the pod
OTHER_NAMESPACE = "OtherNamespace"  # the pod lives outside the binding's namespace
IDENTITY_NOT_LISTED = "IdentityNotListed"  # neither identities nor identityRefs name the pod
SELECTOR_MISMATCH = "SelectorMismatch"  # subjects name the pod, podSelector does not select it

# Conduit method names as Phorge spells them: lower case, dot-separated words.
# Matched whole (fullmatch): "$" would also match before a trailing newline.
_METHOD = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_METHOD_GLOB = re.compile(r"[a-z0-9_.*?\[\]!-]+")
MAX_METHOD_CHARS = 128


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Whether a binding picks a pod, and the reason constant why."""

    matched: bool
    reason: str

    def __bool__(self) -> bool:
        return self.matched


_DECISIONS = {
    reason: Decision(reason == MATCHED, reason)
    for reason in (
        MATCHED,
        OTHER_NAMESPACE,
        IDENTITY_NOT_LISTED,
        SELECTOR_MISMATCH,
    )
}


def identity_matches(
    pattern: str, name: str, naming: identity.Naming = identity.DEFAULT_NAMING
) -> bool:
    """Linkerd's identity match of one ``identities`` entry against a DNS-form name."""
    if pattern.startswith("spiffe://"):
        return identity.spiffe_to_dns(pattern, naming) == name
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])  # ".rest": at least one label stands for the star
    return pattern == name


def selector_matches(selector: resources.LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; None or empty selects everything."""
    if selector is None:
        return True
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        found = labels.get(req.key)
        if req.operator == "In" and (found is None or found not in req.values):
            return False
        if req.operator == "NotIn" and found is not None and found in req.values:
            return False
        if req.operator == "Exists" and found is None:
            return False
        if req.operator == "DoesNotExist" and found is not None:
            return False
    return True


def subjects_match(
    spec: resources.BindingSpec,
    namespace: str,
    service_account: str,
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> bool:
    """Does the binding's subject list name this (service account, namespace)?"""
    name = identity.linkerd_identity(service_account, namespace, naming)
    if any(identity_matches(p, name, naming) for p in spec.identities):
        return True
    for ref in spec.identity_refs:
        if ref.kind == "Namespace":
            if ref.name in (namespace, "*"):
                return True
        elif (ref.namespace or namespace) == namespace and ref.name in (service_account, "*"):
            return True
    return False


def select(
    spec: resources.BindingSpec,
    binding_namespace: str,
    pod: identity.PodFacts,
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> Decision:
    """Do the binding's namespace, subjects and selector pick this pod (whatever its state)?"""
    if pod.namespace != binding_namespace:
        return _DECISIONS[OTHER_NAMESPACE]
    if not subjects_match(spec, pod.namespace, pod.service_account, naming):
        return _DECISIONS[IDENTITY_NOT_LISTED]
    if not selector_matches(spec.pod_selector, pod.labels):
        return _DECISIONS[SELECTOR_MISMATCH]
    return _DECISIONS[MATCHED]


def matches(
    spec: resources.BindingSpec,
    binding_namespace: str,
    pod: identity.PodFacts,
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> bool:
    """The binding picks this pod (whether or not it is meshed or running)."""
    return select(spec, binding_namespace, pod, naming).matched


def _could_name_namespace(pattern: str, namespace: str, naming: identity.Naming | None) -> bool:
    """Can a ``*.``-pattern match some identity of ``namespace``? (None: any suffix.)"""
    rest = pattern[2:]
    if naming is None:
        # Without the cluster's naming, only the namespace label itself can be checked.
        labels = rest.split(".")
        if "serviceaccount" not in labels:
            return True
        at = labels.index("serviceaccount")
        return at == 0 or labels[at - 1] == namespace
    home = f".{namespace}.{naming.suffix}"
    # Either the pattern's rest ends the home part (any service account matches), or it
    # reaches into the service account's name (a dotted name can end with it).
    return home.endswith("." + rest) or ("." + rest).endswith(home)


def _other_namespace(namespace: str, binding_namespace: str) -> str:
    return (
        f"names a service account of namespace {namespace!r}; "
        f"a binding only matches pods in its own ({binding_namespace!r})"
    )


def _spiffe_problem(
    pattern: str, binding_namespace: str, naming: identity.Naming | None
) -> str | None:
    parsed = identity.parse_spiffe(pattern)
    if parsed is None:
        return "not a spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount> ID"
    trust_domain, namespace, _ = parsed
    if naming is not None and trust_domain != naming.trust_domain:
        return (
            f"trust domain {trust_domain!r} is not this cluster's ({naming.trust_domain!r}), "
            "so it can never match"
        )
    if namespace != binding_namespace:
        return _other_namespace(namespace, binding_namespace)
    return None


def _identity_problem(
    pattern: str, binding_namespace: str, naming: identity.Naming | None
) -> str | None:
    if pattern.startswith("spiffe://"):
        return _spiffe_problem(pattern, binding_namespace, naming)
    if pattern == "*":
        return None
    if "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*.")):
        return (
            "'*' may only stand alone or as a whole leading label ('*.rest'); "
            "Linkerd reads any other '*' literally, so this never matches"
        )
    if pattern.startswith("*."):
        if not pattern[2:] or any(not label for label in pattern[2:].split(".")):
            return "the wildcard's rest has an empty label"
        if not _could_name_namespace(pattern, binding_namespace, naming):
            return (
                f"matches no identity of namespace {binding_namespace!r}, "
                "the only one a binding matches"
            )
        return None
    if naming is None:
        head, sep, _ = pattern.partition(".serviceaccount.identity.")
        if not sep:
            return "not a Linkerd identity (<sa>.<ns>.serviceaccount.identity.<cp-ns>.<domain>)"
        namespace = head.rpartition(".")[2]
    else:
        parsed_name = identity.parse_identity(pattern, naming)
        if parsed_name is None:
            return f"not a Linkerd identity of this cluster (<sa>.<ns>.{naming.suffix})"
        namespace = parsed_name[1]
    if namespace != binding_namespace:
        return _other_namespace(namespace, binding_namespace)
    return None


def validate_subjects(
    spec: resources.BindingSpec,
    binding_namespace: str,
    naming: identity.Naming | None = None,
) -> list[str]:
    """Problems the CRD schema cannot express, each naming its field.

    With ``naming``, identities are also checked against this cluster's suffix
    and trust domain; without it, only their shape and namespace.
    """
    problems: list[str] = []
    for i, pattern in enumerate(spec.identities):
        problem = _identity_problem(pattern, binding_namespace, naming)
        if problem is not None:
            problems.append(f"spec.identities[{i}]: {problem}")
    for i, ref in enumerate(spec.identity_refs):
        field = f"spec.identityRefs[{i}]"
        if ref.kind == "ServiceAccount":
            if ref.name != "*" and not identity.is_service_account_name(ref.name):
                problems.append(f"{field}.name: {ref.name!r} is not a valid ServiceAccount name")
            if ref.namespace and ref.namespace != binding_namespace:
                problems.append(
                    f"{field}.namespace: {ref.namespace!r} is another namespace; "
                    f"a binding only matches pods in its own ({binding_namespace!r})"
                )
        elif ref.name not in (binding_namespace, "*"):
            problems.append(
                f"{field}.name: namespace {ref.name!r} is not this binding's "
                f"({binding_namespace!r}), so it can never match"
            )
    problems.extend(validate_selector(spec.pod_selector, "spec.podSelector"))
    return problems


def validate_selector(selector: resources.LabelSelector | None, field: str) -> list[str]:
    """What the API server would refuse in a LabelSelector: values with the wrong operator."""
    problems: list[str] = []
    if selector is None:
        return problems
    for i, req in enumerate(selector.match_expressions):
        where = f"{field}.matchExpressions[{i}].values"
        if req.operator in ("In", "NotIn") and not req.values:
            problems.append(f"{where}: must not be empty with operator {req.operator}")
        if req.operator in ("Exists", "DoesNotExist") and req.values:
            problems.append(f"{where}: must be empty with operator {req.operator}")
    return problems


def validate_method_globs(globs: Iterable[str], field: str = "spec.allowedMethods") -> list[str]:
    """Globs that can never match a Conduit method name (upper case, slashes, spaces...)."""
    return [
        f"{field}[{i}]: {glob!r} can match no Conduit method (lower-case letters, digits, "
        "'_', '.', and the glob characters '*', '?', '[...]' only)"
        for i, glob in enumerate(globs)
        if not _METHOD_GLOB.fullmatch(glob)
    ]


def method_allowed(method: str, globs: Iterable[str]) -> bool:
    """Is a Conduit method (``differential.revision.search``) allowed by any glob?

    fnmatch-style, case-sensitive (``*`` also crosses dots: ``user.*`` allows
    ``user.whoami`` and ``user.search``). Names that are not Conduit method names
    (upper case, slashes, ``..``, spaces, empty) are never allowed, whatever the globs.
    """
    return allowing_glob(method, globs) is not None


def is_method_name(method: str) -> bool:
    """Is ``method`` a Conduit method name, whole (no trailing newline or other tail)?"""
    return len(method) <= MAX_METHOD_CHARS and _METHOD.fullmatch(method) is not None


def allowing_glob(method: str, globs: Iterable[str]) -> str | None:
    """The first glob that allows ``method`` (see :func:`method_allowed`), or None."""
    if not is_method_name(method):
        return None
    return next((glob for glob in globs if glob and fnmatch.fnmatchcase(method, glob)), None)
