"""phabmesh under its own RBAC: the manifests' ServiceAccounts, roles and bindings applied to a
test control plane, a kubeconfig per process with a TokenRequest token for its
ServiceAccount, and what the API server's audit log says each one asked for.

A call is ``(namespace or None, API group, resource[/subresource], verb, name or None)``,
the shape of tests/integration/test_manifests.py's tables. Grants are read from the
manifests, never listed here, so that whatever the manifests grant is what is checked.

Two checks, over every control plane of the session (tests/conftest.py):

- a call RBAC refused fails the session: a grant missing from the manifests;
- a grant no call used (session_unused()) is listed at the end, and fails the session when
  the whole suite ran: pytest was given no paths, so it collected its configured
  ``testpaths`` (``make test``, which ``.ci/run`` runs, with ``PYTEST_ARGS`` empty), and
  nothing was deselected or ignored (no ``-k``, ``-m``, ``--deselect``, ``--lf``,
  ``--ignore``). A part of the suite cannot be expected to use every grant, so a single
  file, ``make test-unit`` or ``-k`` only lists them. ``PHABMESH_RBAC_UNUSED=fail`` makes
  any run fail on them (say, ``tests/integration tests/e2e``, the tests that run phabmesh),
  ``PHABMESH_RBAC_UNUSED=list`` makes none fail.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from phabmesh.dev import devcluster

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
Call = tuple[str | None, str, str, str, str | None]
WHO = ("operator", "gateway")
# Across the test session: what the manifests grant, and every call phabmesh made and was
# allowed, on every control plane it ran on under RBAC (see record()).
GRANTED: dict[str, set[Call]] = {}
USED: dict[str, set[Call]] = {who: set() for who in WHO}


def account(who: str) -> tuple[str, str]:
    """Namespace and name of the ServiceAccount ``phabmesh-<who>`` in the manifests."""
    return "phabmesh-system", f"phabmesh-{who}"


def username(who: str) -> str:
    namespace, name = account(who)
    return f"system:serviceaccount:{namespace}:{name}"


@dataclasses.dataclass(frozen=True)
class Installed:
    """The manifests' RBAC on a control plane, and a kubeconfig per phabmesh process."""

    plane: devcluster.ControlPlane
    docs: list[dict[str, Any]]
    kubeconfigs: dict[str, Path]

    def kubeconfig(self, who: str) -> str:
        return str(self.kubeconfigs[who])

    def granted(self, who: str) -> set[Call]:
        return granted(self.docs, who)

    def used(self, who: str) -> set[Call]:
        return {call for call, allowed in calls(self.plane, who) if allowed}

    def forbidden(self, who: str) -> set[Call]:
        """Calls RBAC refused and never allowed: while an API server (re)starts, its
        authorizer refuses everything until it has read the roles, which is no missing grant.
        """
        made = calls(self.plane, who)
        return {call for call, allowed in made if not allowed} - {c for c, ok in made if ok}

    def record(self) -> None:
        """Add this control plane's allowed calls to the session's (USED, GRANTED)."""
        for who in WHO:
            GRANTED[who] = self.granted(who)
            USED[who] |= self.used(who)


def session_unused() -> dict[str, set[Call]]:
    """Grants no call of the session used, per process (empty if phabmesh never ran)."""
    return {who: unused(GRANTED[who], USED[who]) for who in WHO if who in GRANTED}


# Applied with the RBAC: what narrows the operator's grants where RBAC cannot (its Secret
# creates), so that phabmesh runs under it too. (The lease policy is not: other tests write
# leases as the cluster's admin; tests/integration/test_lease_policy.py applies it.)
POLICIES = ("phabmesh-secret-writers", "phabmesh-gateway-secrets")


def install(plane: devcluster.ControlPlane) -> Installed:
    docs: list[dict[str, Any]] = plane.install_rbac(MANIFESTS)  # type: ignore[assignment]
    rendered = plane.kubectl("kustomize", str(MANIFESTS)).stdout
    policies = [
        d
        for d in yaml.safe_load_all(rendered)
        if d
        and d["kind"].startswith("ValidatingAdmissionPolicy")
        and d["metadata"]["name"] in POLICIES
    ]
    if policies:
        plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(policies))
    kubeconfigs = {who: plane.service_account_kubeconfig(*account(who)) for who in WHO}
    return Installed(plane, docs, kubeconfigs)


def granted(docs: list[dict[str, Any]], who: str) -> set[Call]:
    """What the (Cluster)RoleBindings among ``docs`` grant ServiceAccount phabmesh-<who>."""
    namespace, name = account(who)
    subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"].endswith("Role")}
    grants: set[Call] = set()
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        if subject not in binding["subjects"]:
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule["verbs"]:
                        for res_name in rule.get("resourceNames") or [None]:
                            grants.add((ns, group, resource, verb, res_name))
    return grants


def calls(plane: devcluster.ControlPlane, who: str) -> list[tuple[Call, bool]]:
    """Each resource request ServiceAccount phabmesh-<who> made, and whether RBAC allowed it.

    The authorizer's decision, not the HTTP status: a 403 also answers, say, an Event
    created in a namespace being deleted.
    """
    user = username(who)
    made: list[tuple[Call, bool]] = []
    for event in plane.audit_events():
        if (event.get("user") or {}).get("username") != user:  # type: ignore[attr-defined]
            continue
        ref: dict[str, Any] = event.get("objectRef") or {}  # type: ignore[assignment]
        if not ref.get("resource"):
            continue  # discovery and other non-resource URLs: allowed to everyone
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        call: Call = (
            ref.get("namespace") or None,
            ref.get("apiGroup") or "",
            resource,
            str(event["verb"]),
            ref.get("name") or None,
        )
        annotations: dict[str, str] = event.get("annotations") or {}  # type: ignore[assignment]
        made.append((call, annotations.get("authorization.k8s.io/decision") != "forbid"))
    return made


def covers(grant: Call, call: Call) -> bool:
    """Whether ``grant`` is what allows ``call``."""
    ns, group, resource, verb, name = grant
    c_ns, c_group, c_resource, c_verb, c_name = call
    return (
        (group, resource, verb) == (c_group, c_resource, c_verb)
        and (ns is None or ns == c_ns)
        and (name is None or name == c_name)
    )


def unused(grants: set[Call], used: set[Call]) -> set[Call]:
    return {g for g in grants if not any(covers(g, call) for call in used)}
