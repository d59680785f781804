"""Prometheus metrics of every phabmesh process, in one place so names stay consistent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEASES_ISSUED = Counter("phabmesh_leases_issued_total", "Credential leases issued")
LEASES_REVOKED = Counter("phabmesh_leases_revoked_total", "Credential leases revoked", ["reason"])
LEASES_ACTIVE = Gauge("phabmesh_leases_active", "Active credential leases known to this process")
BOT_CHECKS = Counter("phabmesh_bot_checks_total", "PhabricatorBot checks", ["reason"])
CREDENTIAL_REQUESTS = Counter(
    "phabmesh_credential_requests_total", "Credential endpoint requests", ["outcome"]
)
TOKEN_REVIEWS = Counter(
    "phabmesh_token_reviews_total",
    "Tokens presented at the credential endpoint, by what became of them (cached, "
    "refused_cached, not_a_token, limited_source, limited_all, authenticated, refused)",
    ["result"],
)
CREDENTIAL_LATENCY = Histogram(
    "phabmesh_credential_request_seconds",
    "Credential endpoint latency",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
GATEWAY_REQUESTS = Counter(
    "phabmesh_gateway_requests_total", "Gateway calls", ["method", "decision"]
)
GATEWAY_LATENCY = Histogram(
    "phabmesh_gateway_request_seconds",
    "Gateway latency (whole call, upstream included)",
    ["decision"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
GATEWAY_UPSTREAM_ERRORS = Counter(
    "phabmesh_gateway_upstream_errors_total", "Phabricator failures seen by the gateway", ["kind"]
)
GATEWAY_REVOCATIONS_SEEN = Counter(
    "phabmesh_gateway_revocations_seen_total", "Lease revocations seen on the gateway's watch"
)
POD_INJECTIONS = Counter(
    "phabmesh_pod_injections_total", "Pods seen by the injection webhook", ["outcome"]
)
