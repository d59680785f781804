"""Prometheus metrics of every phabmesh process, in one place so names stay consistent.

Each process (the operator, the gateway) makes one :class:`Metrics`, on a registry of its
own, calls :func:`use` when it starts, and serves that registry on its ``/metrics``. Code
records through :func:`current`: the :class:`Metrics` of the process it runs in (a
context variable, which asyncio tasks, ``asyncio.to_thread`` and kopf's handlers inherit),
so that two processes sharing an interpreter never mix their series. Outside any process
(a tool, a unit test) :func:`current` is the interpreter's default, on prometheus_client's
global registry.

Every label's values are bounded: reasons are enumerated constants and anything else is
counted as :data:`OTHER`; object labels name admin-created objects (bots, bindings); a
per-object gauge keeps one series per object, replaced when its reason changes and removed
when the object is deleted. See docs/metrics.md for the list.
"""

from __future__ import annotations

import contextvars
import datetime
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from phabmesh.clock import utcnow

OTHER = "other"  # any label value outside its enumeration

# PhabricatorBot Ready reasons (phabmesh.controller.bots).
BOT_REASONS = frozenset(
    {
        "Verified",
        "SecretMissing",
        "SecretKeyMissing",
        "TokenInvalid",
        "UsernameMismatch",
        "NotABot",
        "Disabled",
        "PhabricatorUnavailable",
        "InvalidSpec",
    }
)
# PhabricatorBinding Ready reasons (phabmesh.leases.reasons).
BINDING_REASONS = frozenset(
    {"Ready", "InvalidSpec", "InvalidSubjects", "BotNotReady", "BotNotAllowed"}
)
# PhabricatorCredential status.reason (phabmesh.resources.REVOCATION_REASONS).
REVOCATION_REASONS = frozenset(
    {
        "PodTerminating",
        "PodSucceeded",
        "PodFailed",
        "PodDeleted",
        "PodGone",
        "PodNotRunning",
        "PodNotMeshed",
        "NoLongerMatched",
        "BindingDeleted",
        "BindingNotReady",
        "BotNotReady",
        "BotChanged",
        "BotNotAllowed",
        "RevokedByAdmin",
    }
)
# Why the credential endpoint refused: its answers' error codes, and for an Active lease it
# would not honour, why (a revocation reason, or LeaseMismatch).
CREDENTIAL_REFUSALS = frozenset(
    {
        "not_ready",
        "invalid_request",
        "invalid_format",
        "invalid_token",
        "rate_limited",
        "review_unavailable",
        "no_lease",
        "lease_ended",
        "ambiguous_binding",
        "identity_mismatch",
        "no_client_id",
        "LeaseMismatch",
    }
    | REVOCATION_REASONS
)
# Why the gateway refused a call (did not forward it): its decisions, and for a revoked or
# unusable lease, why.
GATEWAY_REFUSALS = frozenset(
    {
        "too_large",
        "bad_request",
        "no_credential",
        "not_ready",
        "invalid",
        "unconfirmed",
        "identity_mismatch",
        "no_client_id",
        "method_denied",
        "bot_token_missing",
        "worker_lost",
        "revoked",  # a Revoked lease without a reason
        "LeaseDeleted",
        "LeaseGone",
        "LeaseExpired",
        "CredentialOutlivedTTL",
    }
    | REVOCATION_REASONS
)
# What became of a webhook delivery (phabmesh_hook_deliveries_total{source,outcome}):
# delivered (the target answered below 400), target_error (it answered 400 or more), or why it
# was not forwarded. Never a webhook's name: an unknown one comes from anyone.
HOOK_OUTCOMES = frozenset(
    {
        "delivered",
        "target_error",
        "target_unreachable",
        "target_timeout",
        "unknown_webhook",
        "not_ready",
        "unconfirmed",
        "key_unavailable",
        "unsigned",
        "bad_signature",
        "malformed",
        "stale",
        "replayed",
        "replay_full",
        "busy",
        "too_large",
        "body_timeout",
        # Harbormaster build steps
        "method_not_allowed",
        "no_credential",
        "bad_credential",
        "no_target",
        "unknown_target",
        "finished_target",
        "not_building",
        "bot_unavailable",
        "bot_not_allowed",
        "phabricator_unavailable",
        "phabricator_error",
    }
)
# Where a call to /hooks/ came from (unknown: refused before its webhook was found).
HOOK_SOURCES = frozenset({"herald", "harbormaster", "unknown"})
# What the controller's work queue holds (phabmesh.controller.driver.Work.kind).
WORK_KINDS = frozenset(
    {"pod", "lease", "binding", "namespace", "judge", "bot", "webhook", "unfinalize", "revoked"}
)
# Resources whose watches are reported (phabmesh_watch_*{resource}).
WATCHED_RESOURCES = frozenset(
    {"pods", "namespaces", "leases", "bindings", "bots", "secrets", "webhooks"}
)


def bounded(value: str, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed``, else :data:`OTHER`."""
    return value if value in allowed else OTHER


class Watch(Protocol):
    """What the watch metrics read from a watch (a :class:`phabmesh.kube.informer.Informer`)."""

    @property
    def resource(self) -> str: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def alive_at(self) -> float: ...


class LeaseCounts(Protocol):
    """Where active leases are counted (the controller's World)."""

    def active_leases(self, now: datetime.datetime) -> Mapping[tuple[str, str], int]: ...


class _Watches(Collector):
    """phabmesh_watch_connected and phabmesh_watch_last_resync_timestamp_seconds, read from the
    process's watches at scrape time. Several watches of one resource in a process: connected
    only while all are; the last resync is the stalest one's (0 while one has never listed)."""

    def __init__(self) -> None:
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, watch: Watch) -> None:
        with self._lock:
            self._watches.add(watch)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "phabmesh_watch_connected",
                "1 while every watch of the resource in this process is connected and synced",
                labels=["resource"],
            ),
            GaugeMetricFamily(
                "phabmesh_watch_last_resync_timestamp_seconds",
                "When the resource's watch last listed or got an event or bookmark (the "
                "stalest of this process's watches of it)",
                labels=["resource"],
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        connected, resync = self._families()
        with self._lock:
            watches = list(self._watches)
        by_resource: dict[str, list[Watch]] = {}
        for watch in watches:
            if watch.resource in WATCHED_RESOURCES:
                by_resource.setdefault(watch.resource, []).append(watch)
        for resource, group in sorted(by_resource.items()):
            connected.add_metric([resource], 1.0 if all(w.healthy for w in group) else 0.0)
            resync.add_metric([resource], min(w.alive_at for w in group))
        return [connected, resync]


class _ActiveLeases(Collector):
    """phabmesh_leases_active{namespace,binding}, counted in the controller's World at scrape
    time: every binding it knows (0 without leases), and any binding name active leases
    still carry."""

    def __init__(self) -> None:
        self._source: weakref.ref[LeaseCounts] | None = None

    def track(self, source: LeaseCounts) -> None:
        self._source = weakref.ref(source)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "phabmesh_leases_active",
            "Active (not revoked, not expired) credential leases, per binding",
            labels=["namespace", "binding"],
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        source = self._source() if self._source is not None else None
        if source is not None:
            now = utcnow()
            for (namespace, binding), count in sorted(source.active_leases(now).items()):
                family.add_metric([namespace, binding], float(count))
        return [family]


class PerObject:
    """A gauge with one series per object (its labels, then a reason): a new reason replaces
    the object's series, and :meth:`forget` removes it."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._reasons: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()

    def set(self, key: tuple[str, ...], reason: str, value: float) -> None:
        with self._lock:
            old = self._reasons.get(key)
            if old is not None and old != reason:
                self.gauge.remove(*key, old)
            self._reasons[key] = reason
            self.gauge.labels(*key, reason).set(value)

    def forget(self, key: tuple[str, ...]) -> None:
        with self._lock:
            old = self._reasons.pop(key, None)
            if old is not None:
                self.gauge.remove(*key, old)

    def keys(self) -> list[tuple[str, ...]]:
        with self._lock:
            return list(self._reasons)


OPERATOR, GATEWAY, ANY = "operator", "gateway", "any"


class Metrics:
    """Every metric of one process, on its own registry (by default a fresh one, with the
    process, platform and garbage-collector collectors prometheus_client has).

    All metrics can be recorded; the registry serves only the ``process``'s own
    (:data:`OPERATOR`, :data:`GATEWAY`, or :data:`ANY` for both), so that a gateway's
    /metrics does not show the controller's metrics at zero, nor the reverse.
    """

    def __init__(self, process: str = ANY, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = r = registry
        # -- the controller (operator process)
        self.leases_issued = Counter(
            "phabmesh_leases_issued_total", "Credential leases created", registry=None
        )
        self.events = Counter(
            "phabmesh_events_total",
            "Kubernetes Events the operator made, by outcome: posted, failed (the API server "
            "refused or did not answer), dropped (too many not yet posted)",
            ["outcome"],
            registry=None,
        )
        self.leases_revoked = Counter(
            "phabmesh_leases_revoked_total",
            "Credential leases revoked, by revocation reason",
            ["reason"],
            registry=None,
        )
        self.bot_checks = Counter(
            "phabmesh_bot_checks_total",
            'PhabricatorBot checks, by result ("Ready" or the NotReady reason)',
            ["result"],
            registry=None,
        )
        self.bot_ready = PerObject(
            Gauge(
                "phabmesh_bot_ready",
                "1 while the PhabricatorBot's Ready condition is True, else 0 (reason: the "
                "condition's reason)",
                ["bot", "reason"],
                registry=None,
            )
        )
        self.binding_ready = PerObject(
            Gauge(
                "phabmesh_binding_ready",
                "1 while the PhabricatorBinding's Ready condition is True, else 0 (reason: the "
                "condition's reason)",
                ["namespace", "binding", "reason"],
                registry=None,
            )
        )
        self.active_leases = _ActiveLeases()
        self.operator_acting = Gauge(
            "phabmesh_operator_acting",
            "1 while this replica's controller acts (started, not paused by kopf peering, "
            "its own keep-alive fresh)",
            registry=None,
        )
        self.writes_deferred = Counter(
            "phabmesh_controller_writes_deferred_total",
            "Controller writes not made because this replica was not acting (peering)",
            registry=None,
        )
        self.work_waiting = Gauge(
            "phabmesh_controller_work_waiting",
            "Controller work queued and not yet taken (each object's work once, however often "
            "it was queued): what the controller has yet to catch up with",
            registry=None,
        )
        self.work_handled = Counter(
            "phabmesh_controller_work_handled_total",
            "Controller work handled, by kind (pod, lease, namespace, judge, binding, bot, "
            "webhook...)",
            ["kind"],
            registry=None,
        )
        # Each kind's child made once: a piece of work handled is one increment.
        self._work_handled = {
            kind: self.work_handled.labels(kind) for kind in (*sorted(WORK_KINDS), OTHER)
        }
        # -- the credential endpoint and the webhook (operator process)
        self.credential_requests = Counter(
            "phabmesh_credential_requests_total",
            'Credential endpoint requests, by outcome ("issued" or "refused_<HTTP status>")',
            ["outcome"],
            registry=None,
        )
        self.credential_refusals = Counter(
            "phabmesh_credential_refusals_total",
            "Credential endpoint refusals, by reason",
            ["reason"],
            registry=None,
        )
        self.token_reviews = Counter(
            "phabmesh_token_reviews_total",
            "Tokens presented at the credential endpoint, by what became of them (cached, "
            "refused_cached, joined, not_a_token, limited_source, limited_namespace, "
            "limited_all, reserve, authenticated, refused)",
            ["result"],
            registry=None,
        )
        self.credential_latency = Histogram(
            "phabmesh_credential_request_seconds",
            "Credential endpoint latency",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=None,
        )
        self.pod_injections = Counter(
            "phabmesh_pod_injections_total",
            "Pods seen by the injection webhook, by outcome",
            ["outcome"],
            registry=None,
        )
        self.webhook_refused = Counter(
            "phabmesh_webhook_refused_total",
            "AdmissionReviews the webhook refused unread, by reason (TooLarge, Busy, Slow, "
            "Malformed): each pod was created without injection",
            ["reason"],
            registry=None,
        )
        self.webhook_certificate_expiry = Gauge(
            "phabmesh_webhook_certificate_expiry_timestamp_seconds",
            "notAfter of the webhook's serving certificate (Unix time)",
            registry=None,
        )
        self.signing_key_rotation_due = Gauge(
            "phabmesh_signing_key_rotation_due_timestamp_seconds",
            "When the current signing key is due for rotation: its creation plus the "
            "rotation interval (Unix time)",
            registry=None,
        )
        # -- the gateway
        self.gateway_requests = Counter(
            "phabmesh_gateway_requests_total",
            "Gateway calls",
            ["method", "decision"],
            registry=None,
        )
        self.gateway_refusals = Counter(
            "phabmesh_gateway_refusals_total",
            "Gateway calls refused (not forwarded), by reason",
            ["reason"],
            registry=None,
        )
        self.gateway_latency = Histogram(
            "phabmesh_gateway_request_seconds",
            "Gateway latency (whole call, upstream included)",
            ["decision"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=None,
        )
        self.gateway_upstream_errors = Counter(
            "phabmesh_gateway_upstream_errors_total",
            "Phabricator failures seen by the gateway",
            ["kind"],
            registry=None,
        )
        self.gateway_revocations_seen = Counter(
            "phabmesh_gateway_revocations_seen_total",
            "Lease revocations seen on the gateway's watch",
            registry=None,
        )
        self.gateway_catch_ups = Counter(
            "phabmesh_gateway_catch_ups_total",
            "Calls with a credential issued moments ago that waited for the gateway's watches "
            "to see its lease, binding or bot token, by outcome",
            ["outcome"],
            registry=None,
        )
        self.gateway_fail_closed = Gauge(
            "phabmesh_gateway_fail_closed",
            "1 while the gateway refuses every credential because a watch it needs is down or "
            "not synced (or its signing keys are not loaded)",
            registry=None,
        )
        self.hook_deliveries = Counter(
            "phabmesh_hook_deliveries_total",
            "Webhook deliveries (Herald) and build step calls (Harbormaster) received by the "
            "gateway, by source and outcome",
            ["source", "outcome"],
            registry=None,
        )
        self.hook_latency = Histogram(
            "phabmesh_hook_delivery_seconds",
            "Webhook delivery latency (whole delivery, the target's answer included)",
            ["source", "outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=None,
        )
        # -- both
        self.watches = _Watches()
        self.task_failures = Counter(
            "phabmesh_task_failures_total",
            "Background tasks (watches, key rotation, peering, the webhook's process) that "
            "ended with an unexpected error or returned, by task; each is started again",
            ["task"],
            registry=None,
        )
        operator: list[Collector] = [
            self.leases_issued,
            self.leases_revoked,
            self.events,
            self.bot_checks,
            self.bot_ready.gauge,
            self.binding_ready.gauge,
            self.active_leases,
            self.operator_acting,
            self.writes_deferred,
            self.work_waiting,
            self.work_handled,
            self.credential_requests,
            self.credential_refusals,
            self.token_reviews,
            self.credential_latency,
            self.pod_injections,
            self.webhook_refused,
            self.webhook_certificate_expiry,
            self.signing_key_rotation_due,
        ]
        gateway: list[Collector] = [
            self.gateway_requests,
            self.gateway_refusals,
            self.gateway_latency,
            self.gateway_upstream_errors,
            self.gateway_revocations_seen,
            self.gateway_catch_ups,
            self.gateway_fail_closed,
            self.hook_deliveries,
            self.hook_latency,
        ]
        served = {OPERATOR: operator, GATEWAY: gateway, ANY: operator + gateway}[process]
        for collector in [*served, self.watches, self.task_failures]:
            r.register(collector)

    # -- recording, with bounded labels ------------------------------------------------------

    def task_failed(self, task: str) -> None:
        self.task_failures.labels(task).inc()

    def work_done(self, kind: str) -> None:
        self._work_handled[bounded(kind, WORK_KINDS)].inc()

    def lease_issued(self) -> None:
        self.leases_issued.inc()

    def lease_revoked(self, reason: str) -> None:
        self.leases_revoked.labels(bounded(reason, REVOCATION_REASONS)).inc()

    def bot_checked(self, ready: bool, reason: str) -> None:
        self.bot_checks.labels("Ready" if ready else bounded(reason, BOT_REASONS)).inc()

    def bot_status(self, bot: str, ready: bool, reason: str) -> None:
        self.bot_ready.set((bot,), bounded(reason, BOT_REASONS), 1.0 if ready else 0.0)

    def bot_gone(self, bot: str) -> None:
        self.bot_ready.forget((bot,))

    def binding_status(self, namespace: str, binding: str, ready: bool, reason: str) -> None:
        self.binding_ready.set(
            (namespace, binding), bounded(reason, BINDING_REASONS), 1.0 if ready else 0.0
        )

    def binding_gone(self, namespace: str, binding: str) -> None:
        self.binding_ready.forget((namespace, binding))

    def credential_refused(self, reason: str) -> None:
        self.credential_refusals.labels(bounded(reason, CREDENTIAL_REFUSALS)).inc()

    def gateway_refused(self, reason: str) -> None:
        self.gateway_refusals.labels(bounded(reason, GATEWAY_REFUSALS)).inc()

    def hook_delivered(self, source: str, outcome: str, seconds: float) -> None:
        source, outcome = bounded(source, HOOK_SOURCES), bounded(outcome, HOOK_OUTCOMES)
        self.hook_deliveries.labels(source, outcome).inc()
        self.hook_latency.labels(source, outcome).observe(seconds)

    def webhook_certificate_expires(self, when: datetime.datetime) -> None:
        self.webhook_certificate_expiry.set(when.timestamp())

    def signing_key_due(self, when: datetime.datetime) -> None:
        self.signing_key_rotation_due.set(when.timestamp())

    def acting_from(self, acting: Callable[[], bool]) -> None:
        """Read phabmesh_operator_acting from ``acting`` at every scrape."""
        self.operator_acting.set_function(lambda: 1.0 if acting() else 0.0)

    def fail_closed_from(self, failing: Callable[[], bool]) -> None:
        """Read phabmesh_gateway_fail_closed from ``failing`` at every scrape."""
        self.gateway_fail_closed.set_function(lambda: 1.0 if failing() else 0.0)


DEFAULT = Metrics(ANY, REGISTRY)
_current: contextvars.ContextVar[Metrics] = contextvars.ContextVar(
    "phabmesh_metrics", default=DEFAULT
)


def current() -> Metrics:
    """The metrics of the process this code runs in."""
    return _current.get()


def use(metrics: Metrics) -> None:
    """Record into ``metrics`` from here on, in this context and every task started from it."""
    _current.set(metrics)


def samples(metrics: Metrics, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """Every sample named ``name`` in ``metrics``' registry, with its labels."""
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield dict(sample.labels), sample.value
