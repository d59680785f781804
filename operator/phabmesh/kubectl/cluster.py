"""The plugin's reads and writes through phabmesh's Kubernetes client, as the kubeconfig's
user. Every API call of the plugin is here."""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
from collections.abc import Mapping
from typing import Any

import aiohttp
from kubernetes import config as k8s_config

from phabmesh import resources
from phabmesh.clock import utcnow
from phabmesh.kube import KubeClient, NotFound, events, load_connection
from phabmesh.kube.client import JSON
from phabmesh.resources import resource_path
from phabmesh.settings import Settings

CONFIGMAP = "phabmesh-config"  # manifests/config.yaml: the settings both processes read
SYSTEM = "phabmesh-system"  # where the manifests install phabmesh
COMPONENT = "kubectl-phabmesh"  # Events' source


class Missing(Exception):
    """An object the command is about does not exist (exit code 1)."""


@dataclasses.dataclass(frozen=True)
class Options:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    system: str = SYSTEM


def default_namespace(options: Options) -> str:
    """``-n``, else the kubeconfig context's namespace, else ``default`` (as kubectl)."""
    if options.namespace:
        return options.namespace
    try:
        contexts, active = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]  # untyped upstream
            config_file=options.kubeconfig
        )
    except (k8s_config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == options.context), None) or active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


class Session:
    """One API client for one command; use as ``async with Session(options) as s``."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.client = KubeClient(
            load_connection(options.kubeconfig, options.context),
            qps=50.0,
            burst=100,
            component="kubectl-phabmesh",
            timeout=15.0,
            attempts=2,
        )
        self._settings: tuple[Settings, JSON | None] | None = None

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()

    async def get(self, path: str, what: str | None = None) -> JSON:
        """The object at ``path``; :class:`Missing` (saying ``what``) when there is none."""
        try:
            return await self.client.get(path)
        except NotFound:
            raise Missing(f"{what or path} not found") from None

    async def find(self, path: str) -> JSON | None:
        try:
            return await self.client.get(path)
        except NotFound:
            return None

    async def items(self, path: str, **params: str) -> list[JSON]:
        found, _ = await self.client.list_all(path, params=params or None)
        return found

    async def settings(self) -> tuple[Settings, JSON | None]:
        """phabmesh's settings from its ConfigMap (defaults where it says nothing), and the
        ConfigMap (None when there is none). ValueError for a value that does not parse."""
        if self._settings is None:
            configmap = await self.find(
                resource_path("", "v1", "configmaps", self.options.system, CONFIGMAP)
            )
            data: Mapping[str, str] = (configmap or {}).get("data") or {}
            settings = Settings.from_env(data)
            if "PHABMESH_NAMESPACE" not in data:
                settings = settings.replace(namespace=self.options.system)
            self._settings = (settings, configmap)
        return self._settings

    async def clock_skew(self) -> datetime.timedelta:
        """The API server's clock less this machine's (from the ``Date`` of its answer to
        ``/version``, to the second); zero when it does not say."""
        try:
            async with self.client.session.get(
                self.client.connection.host + "/version",
                headers=self.client.connection.headers(),
                timeout=aiohttp.ClientTimeout(total=self.client.timeout),
            ) as answer:
                stamp = answer.headers.get("Date")
            if not stamp:
                return datetime.timedelta()
            server = email.utils.parsedate_to_datetime(stamp)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, TypeError):
            return datetime.timedelta()
        if server.tzinfo is None:
            server = server.replace(tzinfo=datetime.UTC)
        # The Date is truncated to the second: on average half a second behind.
        return server + datetime.timedelta(seconds=0.5) - utcnow()

    async def whoami(self) -> str:
        """The caller's user name (SelfSubjectReview), for the audit line; "" if unknown."""
        try:
            review = await self.client.create(
                "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
            )
        except Exception:  # the audit line says "unknown" rather than fail a revocation
            return ""
        return str(((review.get("status") or {}).get("userInfo") or {}).get("username") or "")

    async def may(self, user: str, groups: list[str], call: tuple[Any, ...]) -> bool:
        """May ``user`` make ``call`` (an apicalls row, one verb)? A SubjectAccessReview."""
        namespace, group, resource, verb, name = call
        resource, _, sub = str(resource).partition("/")
        attributes: JSON = {"group": group, "resource": resource, "verb": verb}
        if sub:
            attributes["subresource"] = sub
        if namespace:
            attributes["namespace"] = namespace
        if name:
            attributes["name"] = name
        return await self.allowed(attributes, user, groups)

    async def allowed(
        self, attributes: JSON, user: str | None = None, groups: list[str] | None = None
    ) -> bool:
        """May ``user`` (in ``groups``) do what ``attributes`` say? A SubjectAccessReview;
        without a user, a SelfSubjectAccessReview: may the caller itself?"""
        kind = "SubjectAccessReview" if user else "SelfSubjectAccessReview"
        spec: JSON = {"resourceAttributes": attributes}
        if user:
            spec.update(user=user, groups=groups or [])
        review = await self.client.create(
            f"/apis/authorization.k8s.io/v1/{kind.lower()}s",
            {"apiVersion": "authorization.k8s.io/v1", "kind": kind, "spec": spec},
        )
        return bool((review.get("status") or {}).get("allowed"))

    async def event(
        self, ref: JSON, reason: str, message: str, now: datetime.datetime, type_: str = "Normal"
    ) -> None:
        """A Kubernetes Event about ``ref`` (created at once, unlike the operator's)."""
        body = events.event_body(
            ref,
            reason,
            message,
            type_,
            now,
            source=COMPONENT,
            reporting_component=f"{resources.GROUP}/{COMPONENT}",
        )
        await self.client.create(
            resource_path("", "v1", "events", body["metadata"]["namespace"]), body
        )
