"""Binding subjects and a pod: match?, label selectors, method allowlists. Pure: no I/O.

Subjects follow Linkerd's ``MeshTLSAuthentication``: ``identities`` are DNS-form
names where ``*`` alone matches every identity and a leading ``*.`` matches any
name ending in the rest (at least one label in place of the star);
``spiffe://`` URIs are another spelling of a DNS name. ``identityRefs`` name
ServiceAccounts (namespace defaulting to the binding's; name ``*`` for all) or
Namespaces (every ServiceAccount in them). A binding only ever matches pods in
its own namespace; ``podSelector`` narrows the match further.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

from phabmesh import identity, resources

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_METHOD = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


def identity_matches(pattern: str, name: str, naming: identity.Naming) -> bool:
    """Linkerd's identity match: exact, ``*``, or a ``*.`` suffix (DNS-form or SPIFFE)."""
    if pattern.startswith("spiffe://"):
        converted = identity.spiffe_to_dns(pattern, naming)
        if converted is None:
            return False
        pattern = converted
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".rest"
        return name.endswith(suffix) and len(name) > len(suffix)
    return pattern == name


def selector_matches(selector: resources.LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; None or empty selects everything."""
    if selector is None:
        return True
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def subjects_match(
    spec: resources.BindingSpec, namespace: str, service_account: str, naming: identity.Naming
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


def matches(
    spec: resources.BindingSpec,
    binding_namespace: str,
    pod: identity.PodFacts,
    naming: identity.Naming,
) -> bool:
    """The binding picks this pod (whether or not it is meshed or running)."""
    if pod.namespace != binding_namespace:
        return False
    if not subjects_match(spec, pod.namespace, pod.service_account, naming):
        return False
    return selector_matches(spec.pod_selector, pod.labels)


def validate_subjects(spec: resources.BindingSpec, binding_namespace: str) -> list[str]:
    """Problems the CRD schema cannot express, each naming its field."""
    problems: list[str] = []
    for i, pattern in enumerate(spec.identities):
        if pattern.startswith("spiffe://") and identity.spiffe_to_dns(pattern) is None:
            problems.append(f"spec.identities[{i}]: not a spiffe://<td>/ns/<ns>/sa/<sa> ID")
        elif (
            "*" in pattern
            and pattern != "*"
            and not (pattern.startswith("*.") and "*" not in pattern[2:])
        ):
            problems.append(f"spec.identities[{i}]: '*' may only stand alone or lead as '*.'")
        elif (parsed := identity.parse_identity(pattern)) and parsed[1] != binding_namespace:
            problems.append(
                f"spec.identities[{i}]: names a service account of namespace {parsed[1]!r}; "
                f"a binding only matches pods in its own ({binding_namespace!r})"
            )
    for i, ref in enumerate(spec.identity_refs):
        if ref.kind == "ServiceAccount" and ref.namespace and ref.namespace != binding_namespace:
            problems.append(
                f"spec.identityRefs[{i}].namespace: {ref.namespace!r} is another namespace; "
                f"a binding only matches pods in its own ({binding_namespace!r})"
            )
        if ref.kind == "Namespace" and ref.name not in (binding_namespace, "*"):
            problems.append(
                f"spec.identityRefs[{i}].name: namespace {ref.name!r} is not this binding's "
                f"({binding_namespace!r}), so it can never match"
            )
    return problems


def method_allowed(method: str, globs: Iterable[str]) -> bool:
    """Is a Conduit method (``differential.revision.search``) allowed by any glob?"""
    if not _METHOD.match(method):
        return False
    return any(fnmatch.fnmatchcase(method, glob) for glob in globs)
