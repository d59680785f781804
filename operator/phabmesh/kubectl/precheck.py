"""``kubectl phabmesh check --pre``: can phabmesh be installed on this cluster, by you?

Asked before an install, as ``linkerd check --pre`` is: the Kubernetes version (the lease
policy is a ValidatingAdmissionPolicy, v1 since 1.30), Linkerd's policy CRDs (the install's
policy objects need them), what of phabmesh or of kopf is there already, and whether your
kubeconfig's user may create what the install creates (SelfSubjectAccessReviews). Each
``judge_*`` is pure; :func:`run` gathers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

from phabmesh import resources
from phabmesh.kube.client import JSON
from phabmesh.kubectl import cluster
from phabmesh.kubectl.checks import (
    FAIL,
    LINKERD_GROUP,
    OK,
    PEERING_CRD,
    PHABMESH_CRDS,
    WARN,
    Result,
    guarded,
)
from phabmesh.resources import resource_path

MIN_MINOR = 30  # Kubernetes 1.30: ValidatingAdmissionPolicy v1
# What an install creates (kustomize and Helm alike): (group, resource, namespaced).
CREATES = (
    ("apiextensions.k8s.io", "customresourcedefinitions", False),
    ("", "namespaces", False),
    ("rbac.authorization.k8s.io", "clusterroles", False),
    ("rbac.authorization.k8s.io", "clusterrolebindings", False),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", False),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies", False),
    ("admissionregistration.k8s.io", "validatingadmissionpolicybindings", False),
    ("rbac.authorization.k8s.io", "roles", True),
    ("rbac.authorization.k8s.io", "rolebindings", True),
    ("", "serviceaccounts", True),
    ("", "services", True),
    ("", "configmaps", True),
    ("apps", "deployments", True),
)


def judge_version(version: Mapping[str, Any]) -> Result:
    major = str(version.get("major", ""))
    minor = re.match(r"\d+", str(version.get("minor", "")))
    shown = str(version.get("gitVersion") or f"{major}.{version.get('minor')}")
    if major != "1" or minor is None:
        return Result("kubernetes", WARN, f"cannot read the version ({shown})")
    if int(minor.group()) < MIN_MINOR:
        return Result(
            "kubernetes",
            FAIL,
            f"{shown}: phabmesh needs 1.{MIN_MINOR} or later (its lease policy is a "
            "ValidatingAdmissionPolicy, admissionregistration.k8s.io/v1)",
        )
    return Result("kubernetes", OK, f"{shown} (1.{MIN_MINOR} or later)")


def judge_linkerd(crds: Mapping[str, JSON | None]) -> Result:
    missing = sorted(name for name, crd in crds.items() if crd is None)
    if missing:
        return Result(
            "linkerd",
            WARN,
            f"Linkerd's policy CRDs are not installed ({', '.join(missing)}): install Linkerd "
            "first, or install phabmesh without its Linkerd objects and checks (helm: "
            "--set linkerd.policy=false,linkerd.requireClientID=false; see docs/security.md)",
        )
    return Result("linkerd", OK, f"Linkerd's policy CRDs are installed ({len(crds)})")


def judge_existing(phabmesh: Mapping[str, JSON | None], kopf: JSON | None) -> Result:
    there = sorted(name for name, crd in phabmesh.items() if crd is not None)
    other = "kopf's peering CRD is there already (another kopf-based operator): shared, kept"
    if there:
        return Result(
            "existing",
            WARN,
            f"phabmesh's CRDs are installed already ({', '.join(there)}): this is an upgrade; "
            "`kubectl phabmesh check` checks that install",
        )
    return Result(
        "existing", OK, "no phabmesh install yet" + (f"; {other}" if kopf is not None else "")
    )


def judge_permissions(denied: Sequence[str], asked: int) -> Result:
    if denied:
        return Result(
            "permissions",
            FAIL,
            "your user may not create: " + ", ".join(denied) + " (a cluster admin installs "
            "phabmesh)",
        )
    return Result("permissions", OK, f"you may create all {asked} kinds the install creates")


async def run(session: cluster.Session) -> list[Result]:
    system = session.options.system

    def crd(name: str) -> str:
        return resource_path("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, name)

    async def version() -> Result:
        return judge_version(await session.client.get("/version"))

    async def linkerd() -> Result:
        names = [f"{p}.{LINKERD_GROUP}" for p in ("servers", "authorizationpolicies")]
        found = await asyncio.gather(*(session.find(crd(n)) for n in names))
        return judge_linkerd(dict(zip(names, found, strict=True)))

    async def existing() -> Result:
        names = [f"{p}.{resources.GROUP}" for p in PHABMESH_CRDS]
        found = await asyncio.gather(*(session.find(crd(n)) for n in names))
        kopf = await session.find(crd(PEERING_CRD))
        return judge_existing(dict(zip(names, found, strict=True)), kopf)

    async def permissions() -> Result:
        async def may(group: str, resource: str, namespaced: bool) -> bool:
            attributes: JSON = {"group": group, "resource": resource, "verb": "create"}
            if namespaced:
                attributes["namespace"] = system
            return await session.allowed(attributes)  # the caller's own

        allowed = await asyncio.gather(*(may(*row) for row in CREATES))
        denied = [
            f"{resource}" + (f" in {system}" if namespaced else "")
            for (_, resource, namespaced), ok in zip(CREATES, allowed, strict=True)
            if not ok
        ]
        return judge_permissions(denied, len(CREATES))

    return list(
        await asyncio.gather(
            guarded("kubernetes", version()),
            guarded("linkerd", linkerd()),
            guarded("existing", existing()),
            guarded("permissions", permissions()),
        )
    )
