"""Stand-ins for Linkerd's policy CRDs (policy.linkerd.io), which the local control plane lacks.

They have the same group, versions and kinds as Linkerd's, and the fields phabmesh's
manifests use (required ones and enums as Linkerd's CRDs declare them), so applying the
manifests' policy objects with strict field validation catches misspelt or missing fields.
``make dev-cluster`` installs them, so that the chart and ``kubectl apply -k manifests/``
install there as on a cluster with Linkerd (nothing enforces the policies: no Linkerd runs).
A development kit: Linkerd's own CRDs come with Linkerd, never from phabmesh.
"""

from __future__ import annotations

from typing import Any

LINKERD_GROUP = "policy.linkerd.io"
Doc = dict[str, Any]


def _ref(required: list[str]) -> Doc:
    return {
        "type": "object",
        "required": required,
        "properties": {k: {"type": "string"} for k in ("group", "kind", "name", "namespace")},
    }


def _selector() -> Doc:
    requirement = {
        "type": "object",
        "required": ["key", "operator"],
        "properties": {
            "key": {"type": "string"},
            "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}},
        },
    }
    return {
        "type": "object",
        "properties": {
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "matchExpressions": {"type": "array", "items": requirement},
        },
    }


LINKERD_SPECS: dict[tuple[str, str, str], Doc] = {
    ("Server", "servers", "v1beta3"): {
        "type": "object",
        "required": ["port", "podSelector"],
        "properties": {
            "podSelector": _selector(),
            "port": {"x-kubernetes-int-or-string": True},
            "proxyProtocol": {
                "type": "string",
                "enum": ["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"],
            },
            "accessPolicy": {
                "type": "string",
                "enum": [
                    "all-unauthenticated",
                    "all-authenticated",
                    "cluster-authenticated",
                    "cluster-unauthenticated",
                    "deny",
                    "audit",
                ],
            },
        },
    },
    ("AuthorizationPolicy", "authorizationpolicies", "v1alpha1"): {
        "type": "object",
        "required": ["targetRef", "requiredAuthenticationRefs"],
        "properties": {
            "targetRef": _ref(["kind", "name"]),
            "requiredAuthenticationRefs": {"type": "array", "items": _ref(["kind", "name"])},
        },
    },
    ("MeshTLSAuthentication", "meshtlsauthentications", "v1alpha1"): {
        "type": "object",
        "properties": {
            "identities": {"type": "array", "items": {"type": "string"}},
            "identityRefs": {"type": "array", "items": _ref(["kind"])},
        },
    },
    ("NetworkAuthentication", "networkauthentications", "v1alpha1"): {
        "type": "object",
        "required": ["networks"],
        "properties": {
            "networks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["cidr"],
                    "properties": {
                        "cidr": {"type": "string"},
                        "except": {"type": "array", "items": {"type": "string"}},
                    },
                },
            }
        },
    },
}


def standin_crds() -> list[Doc]:
    return [
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{LINKERD_GROUP}"},
            "spec": {
                "group": LINKERD_GROUP,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [
                    {
                        "name": version,
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "required": ["spec"],
                                "properties": {"spec": spec},
                            }
                        },
                    }
                ],
            },
        }
        for (kind, plural, version), spec in LINKERD_SPECS.items()
    ]
