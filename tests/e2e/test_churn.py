"""Churn: a seeded, bounded random driver on the real control plane, checked against an
entitlement oracle written from the CRDs' documentation (not from phabmesh's own
matching or decisions).

Each run drives pods (created, phased, deleted gracefully and forcibly, re-created
under reused names), bindings (every field edited, deleted, re-created), bots
(namespaceSelector changed, disabled and enabled in Phabricator) and namespace labels,
in bursts, and restarts the operator once in the middle of a burst (in some runs down
longer than a third of the shortest TTL, so that renewals are due when it returns). No
kubelet and no controllers run: the driver and phabmesh are the only actors.
After each burst, once the leases have settled:

- exactly one Active lease per entitled (pod, binding); none for a pod not entitled;
  no duplicates; each lease for its binding's current bot;
- a lease nothing in the burst touched is the same lease as before (never re-issued);
- a credential exchange succeeds exactly when entitled, and the gateway accepts the new
  credential (acting as the binding's bot) and each earlier one exactly when its lease
  is still the pod's Active lease for that binding.

Settings: ``PHABMESH_CHURN_SEEDS`` (comma-separated; default a short fixed set),
``PHABMESH_CHURN_STEPS`` (steps per run), ``PHABMESH_CHURN_BURST`` (steps per burst),
``PHABMESH_CHURN_BOT_SWAP`` (``0`` leaves out edits of a binding's botRef to another
bot), ``PHABMESH_CHURN_OTHER_MESH`` (``0`` leaves out pods meshed by another Linkerd
control plane), ``PHABMESH_CHURN_SHRINK_SECONDS`` (time allowed to shrink a failure by
replaying fewer steps; ``0``: print every step). A failure prints the seed and the steps.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import fnmatch
import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh import metrics, resources
from phabmesh.credentials import phorge
from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.processes.operator import OperatorProcess
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, settings_for
from tests.stack import Threaded

ROOT = Path(__file__).resolve().parents[2]
G, V = resources.GROUP, resources.VERSION
T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


SEEDS = [int(s) for s in (os.environ.get("PHABMESH_CHURN_SEEDS") or "16,17,13").split(",")]
STEPS = _env_int("PHABMESH_CHURN_STEPS", 36)
BURST = _env_int("PHABMESH_CHURN_BURST", 12)
BOT_SWAP = os.environ.get("PHABMESH_CHURN_BOT_SWAP", "1") != "0"
OTHER_MESH = os.environ.get("PHABMESH_CHURN_OTHER_MESH", "1") != "0"
SHRINK_SECONDS = _env_int("PHABMESH_CHURN_SHRINK_SECONDS", 0)
SETTLE_TIMEOUT = 60.0

# This cluster's Linkerd naming (the test settings' defaults).
CONTROL_PLANE = "linkerd"
TRUST_DOMAIN = "cluster.local"
SUFFIX = f"serviceaccount.identity.{CONTROL_PLANE}.{TRUST_DOMAIN}"

NAMESPACES = ("a", "b")
PODS = ("p0", "p1", "p2", "p3", "p4")
BINDINGS = ("b1", "b2")
BOTS = ("x", "y")
ACCOUNTS = ("sa-1", "sa-2")
TTLS = ("1m", "1m", "2m", "10m")
METHODS: tuple[tuple[str, ...], ...] = (
    ("user.*", "conduit.ping"),
    ("user.whoami",),
    ("conduit.ping",),
    ("*",),
    ("differential.*",),
)
SHORT_DOWN = 3.0
LONG_DOWN = 22.0  # over a third of the 1m TTL: every such lease is due when it returns


# -- the model and its oracle --------------------------------------------------------------


@dataclasses.dataclass
class Pod:
    sa: str
    app: str
    meshed: bool
    # linkerd.io/control-plane-ns: on meshed pods (Linkerd's injector writes it), and on some
    # pods without a proxy (their author wrote it): a label alone never makes a pod meshed.
    control_plane: str | None
    node: bool  # with a node, a graceful deletion leaves it Terminating (no kubelet here)
    phase: str = "Pending"
    terminating: bool = False
    uid: str = ""


@dataclasses.dataclass
class Binding:
    bot: str
    refs: list[dict[str, str]]
    identities: list[str]
    selector: dict[str, Any] | None
    ttl: str
    methods: tuple[str, ...]


@dataclasses.dataclass
class Bot:
    selector_extra: dict[str, str]
    disabled: bool = False


@dataclasses.dataclass
class Model:
    namespaces: dict[str, dict[str, str]]  # logical name -> extra labels
    bots: dict[str, Bot]
    pods: dict[tuple[str, str], Pod] = dataclasses.field(default_factory=dict)
    bindings: dict[tuple[str, str], Binding] = dataclasses.field(default_factory=dict)


def _selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector; absent or empty selects everything."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req["key"], req["operator"], req.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _identity_listed(pattern: str, name: str) -> bool:
    """One ``identities`` entry, as MeshTLSAuthentication reads it (the CRD's description)."""
    if pattern.startswith("spiffe://"):
        domain, _, path = pattern[len("spiffe://") :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            return False
        return name == f"{parts[3]}.{parts[1]}.serviceaccount.identity.{CONTROL_PLANE}.{domain}"
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return pattern == name


def entitled(model: Model, ns: str, run: Run, pod: Pod, binding: Binding) -> bool:
    """Does this pod hold a credential through this binding (both in namespace ``ns``)?"""
    if pod.terminating or pod.phase != "Running":
        return False
    if not pod.meshed or pod.control_plane not in (None, CONTROL_PLANE):
        return False
    real_ns = run.ns(ns)
    name = f"{pod.sa}.{real_ns}.{SUFFIX}"
    # "@ns" in the steps stands for the binding's (and so the pod's) namespace.
    named = any(
        _identity_listed(p.replace("@ns", real_ns), name) for p in binding.identities
    ) or any(
        (ref["kind"] == "ServiceAccount" and ref["name"] in ("*", pod.sa))
        or (ref["kind"] == "Namespace" and ref["name"] in ("*", "@ns"))
        for ref in binding.refs
    )
    if not named or not _selector_matches(binding.selector, {"app": pod.app}):
        return False
    bot = model.bots.get(binding.bot)
    if bot is None or bot.disabled:
        return False
    return _selector_matches(
        {"matchLabels": {**run.bot_selector(bot)}}, run.namespace_labels(model, ns)
    )


def expected(model: Model, run: Run) -> dict[tuple[str, str], str]:
    """(pod UID, binding name) -> bot, for every entitled pair."""
    out: dict[tuple[str, str], str] = {}
    for (ns, _), pod in model.pods.items():
        for (bns, bname), binding in model.bindings.items():
            if bns == ns and entitled(model, ns, run, pod, binding):
                out[(pod.uid, bname)] = binding.bot
    return out


def method_allowed(method: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(method, g) for g in globs)


# -- steps -----------------------------------------------------------------------------------

Step = dict[str, Any]


def _binding_spec(rng: random.Random, *, swap: bool) -> dict[str, Any]:
    bot = rng.choice(BOTS) if swap else "x"
    return {
        "bot": bot,
        "refs": _refs(rng),
        "identities": _identities(rng),
        "selector": _pod_selector(rng),
        "ttl": rng.choice(TTLS),
        "methods": list(rng.choice(METHODS)),
    }


def _refs(rng: random.Random) -> list[dict[str, str]]:
    choices: list[dict[str, str]] = [
        {"kind": "ServiceAccount", "name": "sa-1"},
        {"kind": "ServiceAccount", "name": "sa-2"},
        {"kind": "ServiceAccount", "name": "*"},
        {"kind": "Namespace", "name": "@ns"},
        {"kind": "Namespace", "name": "*"},
    ]
    return rng.sample(choices, rng.choice((0, 1, 1, 2)))


def _identities(rng: random.Random) -> list[str]:
    choices = [
        "*",
        f"*.@ns.{SUFFIX}",
        f"*.{SUFFIX}",
        f"sa-1.@ns.{SUFFIX}",
        f"sa-2.@ns.{SUFFIX}",
        f"spiffe://{TRUST_DOMAIN}/ns/@ns/sa/sa-1",
        f"spiffe://{TRUST_DOMAIN}/ns/@ns/sa/sa-2",
    ]
    return rng.sample(choices, rng.choice((0, 0, 1, 2)))


def _pod_selector(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice(
        [
            None,
            None,
            {"matchLabels": {"app": "a"}},
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["b"]}]},
            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]},
        ]
    )


def generate(seed: int, count: int, burst: int) -> list[Step]:
    """The steps of one run: plain data, replayable; a step that no longer applies (its pod
    is gone, say, after an earlier step was dropped) is skipped when replayed.

    A run starts from one binding and a few Running pods per namespace; each random step is
    drawn from those that apply to the state so far (a shadow of the model: existence and
    phase only), so that most steps change something.
    """
    rng = random.Random(seed)
    shadow = _Shadow()
    steps: list[Step] = []
    for ns in NAMESPACES:
        steps.append(
            {
                "kind": "binding_create",
                "ns": ns,
                "binding": "b1",
                "bot": "x",
                "refs": [{"kind": "ServiceAccount", "name": "*"}],
                "identities": [],
                "selector": None,
                # One short (renewals come often), one long (a shrink can come under it).
                "ttl": "1m" if ns == NAMESPACES[0] else "10m",
                "methods": ["user.*", "conduit.ping"],
            }
        )
        for pod in PODS[:3]:
            steps.append(_pod_create(rng, ns, pod, running=True, control_plane=None))
    for step in steps:
        shadow.apply(step)
    bursts = max(1, (count + burst - 1) // burst)
    # One restart, in the middle of a burst; in every other run, down long.
    restart_burst = rng.randrange(bursts)
    stop_at = restart_burst * burst + rng.randrange(max(1, burst // 2))
    start_at = min(stop_at + 1 + rng.randrange(max(1, burst // 2)), (restart_burst + 1) * burst - 1)
    long_down = seed % 2 == 0
    # In every third run, Phabricator is down across the restart (until the next check):
    # the bots go Unknown and keep their leases, through the restart too.
    dark = seed % 3 == 1
    for i in range(count):
        if i == stop_at:
            if dark:
                steps.append({"kind": "phabricator_down"})
            steps.append({"kind": "operator_stop"})
        if i == start_at:
            steps.append({"kind": "operator_start", "down": LONG_DOWN if long_down else 0.0})
        step = shadow.draw(rng)
        shadow.apply(step)
        steps.append(step)
        if (i + 1) % burst == 0 or i == count - 1:
            steps.append({"kind": "check"})
            if i + 1 == burst:
                # Under the credentials that check handed out: the long TTL shrunk, and judged
                # at once (they stay good until their issue time plus the new TTL).
                steps.append(_ttl_shrink(NAMESPACES[1], "b1"))
                steps.append({"kind": "check"})
    return steps


def _pod_create(
    rng: random.Random, ns: str, pod: str, *, running: bool, control_plane: str | None
) -> Step:
    return {
        "kind": "pod_create",
        "ns": ns,
        "pod": pod,
        "sa": rng.choice(ACCOUNTS),
        "app": rng.choice("ab"),
        "meshed": (meshed := rng.random() < 0.85),
        "control_plane": control_plane,
        # Without a proxy, half carry Linkerd's label anyway (a pod's author may write it).
        "label_only": not meshed and rng.random() < 0.5,
        "node": rng.random() < 0.5,
        "running": running,
    }


class _Shadow:
    """What the generator needs to know of the state: which pods and bindings exist."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], tuple[str, bool, bool]] = {}  # phase, node, terminating
        self.bindings: set[tuple[str, str]] = set()
        self.ttls: dict[tuple[str, str], str] = {}  # each binding's credentialTTL
        self.disabled: set[str] = set()

    def apply(self, step: Step) -> None:
        kind = step["kind"]
        key = (step.get("ns", ""), step.get("pod") or step.get("binding") or "")
        if kind == "pod_create":
            self.pods[key] = ("Running" if step["running"] else "Pending", step["node"], False)
        elif kind == "pod_phase":
            phase, node, terminating = self.pods[key]
            self.pods[key] = (step["phase"], node, terminating)
        elif kind == "pod_delete":
            phase, node, _ = self.pods[key]
            if node and phase not in ("Succeeded", "Failed"):
                self.pods[key] = (phase, node, True)
            else:
                del self.pods[key]
        elif kind == "pod_force_delete":
            del self.pods[key]
        elif kind == "binding_create":
            self.bindings.add(key)
            self.ttls[key] = step["ttl"]
        elif kind == "binding_edit" and step["field"] == "ttl":
            self.ttls[key] = step["value"]
        elif kind == "binding_delete":
            self.bindings.discard(key)
        elif kind == "bot_disabled":
            if step["disabled"]:
                self.disabled.add(step["bot"])
            else:
                self.disabled.discard(step["bot"])

    def draw(self, rng: random.Random) -> Step:
        ns = rng.choice(NAMESPACES)
        free = [p for p in PODS if (ns, p) not in self.pods]
        live = [p for p in PODS if (ns, p) in self.pods and not self.pods[(ns, p)][2]]
        pending = [p for p in live if self.pods[(ns, p)][0] == "Pending"]
        running = [p for p in live if self.pods[(ns, p)][0] == "Running"]
        present = [p for p in PODS if (ns, p) in self.pods]
        bound = [b for b in BINDINGS if (ns, b) in self.bindings]
        unbound = [b for b in BINDINGS if (ns, b) not in self.bindings]
        shrinkable = [b for b in bound if self.ttls.get((ns, b)) != "1m"]
        options: list[tuple[float, Callable[[], Step]]] = [
            (3.0 if free else 0.0, lambda: self._create(rng, ns, free)),
            (3.0 if pending else 0.0, lambda: self._phase(rng, ns, pending)),
            (1.0 if running else 0.0, lambda: self._phase(rng, ns, running)),
            (1.5 if live else 0.0, lambda: _pod_step("pod_delete", ns, rng.choice(live))),
            (
                1.0 if present else 0.0,
                lambda: _pod_step("pod_force_delete", ns, rng.choice(present)),
            ),
            (1.5 if unbound else 0.0, lambda: self._bind(rng, ns, unbound)),
            (0.8 if bound else 0.0, lambda: self._unbind(rng, ns, bound)),
            (4.0 if bound else 0.0, lambda: _binding_edit(rng, ns, rng.choice(bound))),
            # A credentialTTL shrunk under credentials issued with the longer one: they stay
            # good until their issue time plus the new TTL, no longer and no shorter.
            (1.5 if shrinkable else 0.0, lambda: _ttl_shrink(ns, rng.choice(shrinkable))),
            (1.0, lambda: _bot_selector(rng)),
            (1.0, lambda: self._bot_toggle(rng)),
            (1.0, lambda: _namespace_labels(rng, ns)),
        ]
        total = sum(weight for weight, _ in options)
        roll = rng.random() * total
        for weight, make in options:
            if roll < weight:
                return make()
            roll -= weight
        return options[-1][1]()

    def _create(self, rng: random.Random, ns: str, free: list[str]) -> Step:
        control_plane = rng.choice(
            [None, None, None, CONTROL_PLANE, *(["other-linkerd"] if OTHER_MESH else [])]
        )
        return _pod_create(
            rng, ns, rng.choice(free), running=rng.random() < 0.8, control_plane=control_plane
        )

    def _phase(self, rng: random.Random, ns: str, phased: list[str]) -> Step:
        pod = rng.choice(phased)
        if self.pods[(ns, pod)][0] == "Pending":
            phase = rng.choice(["Running", "Running", "Running", "Failed"])
        else:
            phase = rng.choice(["Succeeded", "Failed"])
        return {"kind": "pod_phase", "ns": ns, "pod": pod, "phase": phase}

    def _bind(self, rng: random.Random, ns: str, unbound: list[str]) -> Step:
        spec = _binding_spec(rng, swap=BOT_SWAP)
        if not spec["refs"] and not spec["identities"]:
            spec["refs"] = [{"kind": "ServiceAccount", "name": "*"}]
        return {"kind": "binding_create", "ns": ns, "binding": rng.choice(unbound), **spec}

    def _unbind(self, rng: random.Random, ns: str, bound: list[str]) -> Step:
        return {"kind": "binding_delete", "ns": ns, "binding": rng.choice(bound)}

    def _bot_toggle(self, rng: random.Random) -> Step:
        # Mostly back on soon: a disabled bot entitles nothing, and the checks want entitlements.
        disabled = sorted(self.disabled)
        bot = rng.choice(disabled) if disabled and rng.random() < 0.8 else rng.choice(BOTS)
        return {"kind": "bot_disabled", "bot": bot, "disabled": bot not in self.disabled}


def _pod_step(kind: str, ns: str, pod: str) -> Step:
    return {"kind": kind, "ns": ns, "pod": pod}


def _binding_edit(rng: random.Random, ns: str, binding: str) -> Step:
    fields = ["selector", "refs", "identities", "ttl", "methods"]
    if BOT_SWAP:
        fields.append("bot")
    field = rng.choice(fields)
    value = _binding_spec(rng, swap=True)[field]
    return {"kind": "binding_edit", "ns": ns, "binding": binding, "field": field, "value": value}


def _ttl_shrink(ns: str, binding: str) -> Step:
    return {"kind": "binding_edit", "ns": ns, "binding": binding, "field": "ttl", "value": "1m"}


def _bot_selector(rng: random.Random) -> Step:
    extra = rng.choice([{"phabmesh.io/bots": "allowed"}] * 3 + [{}, {"tier": "x"}])
    return {"kind": "bot_selector", "bot": rng.choice(BOTS), "extra": extra}


def _namespace_labels(rng: random.Random, ns: str) -> Step:
    labels = {}
    if rng.random() < 0.9:
        labels["phabmesh.io/bots"] = "allowed"
    tier = rng.choice([None, "x", "y"])
    if tier:
        labels["tier"] = tier
    return {"kind": "namespace_labels", "ns": ns, "labels": labels}


# -- the running system ----------------------------------------------------------------------


class System:
    """One control plane, Conduit server, operator (restartable) and gateway for all runs."""

    def __init__(self, plane: devcluster.ControlPlane, conduit: ConduitServer) -> None:
        self.plane = plane
        self.cluster = Cluster(plane)
        self.conduit = conduit
        self.settings = settings_for(conduit)
        self.operator: Threaded | None = None
        self.gateway: Threaded | None = None

    def start_operator(self) -> None:
        process = OperatorProcess(self.settings, kubeconfig=str(self.cluster.kubeconfig))
        self.operator = Threaded(process).start()
        wait_for(process.ready, timeout=60, what="operator ready")

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None

    def start_gateway(self) -> None:
        process = GatewayProcess(self.settings, kubeconfig=str(self.cluster.kubeconfig))
        self.gateway = Threaded(process).start()
        wait_for(lambda: process.state.ready, timeout=60, what="gateway ready")

    @property
    def endpoint_port(self) -> int:
        assert self.operator is not None
        return int(self.operator.process.endpoint_port)  # type: ignore[attr-defined]

    @property
    def gateway_port(self) -> int:
        assert self.gateway is not None
        return int(self.gateway.process.port)  # type: ignore[attr-defined]


@dataclasses.dataclass
class Credential:
    token: str
    lease_uid: str
    expires: float
    issued: float  # when it was exchanged (this machine's clock, as the operator's)


class Run:
    """One replay of a list of steps under its own names (namespaces, bots, users)."""

    def __init__(self, system: System, seed: int) -> None:
        self.system = system
        self.cluster = system.cluster
        self.tag = f"c{seed}-{uuid.uuid4().hex[:5]}"
        self.model = Model(
            namespaces={ns: {"phabmesh.io/bots": "allowed"} for ns in NAMESPACES},
            bots={bot: Bot({"phabmesh.io/bots": "allowed"}) for bot in BOTS},
        )
        self.credentials: dict[tuple[str, str], Credential] = {}
        self.dark = False  # Phabricator down since a step of this burst
        self.dark_revoked = 0.0  # leases revoked BotNotReady since (operators stopped meanwhile)
        self.leases_before: dict[tuple[str, str], str] = {}
        self.touched: set[tuple[str, ...]] = set()
        self.log: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()

    # names

    def ns(self, logical: str) -> str:
        return f"{self.tag}-{logical}"

    def bot(self, logical: str) -> str:
        return f"{self.tag}-{logical}"

    def namespace_labels(self, model: Model, logical: str) -> dict[str, str]:
        return {"churn-run": self.tag, **model.namespaces[logical]}

    def bot_selector(self, bot: Bot) -> dict[str, str]:
        return {"churn-run": self.tag, **bot.selector_extra}

    # set-up

    def setup(self) -> None:
        core = self.cluster.core
        for logical in NAMESPACES:
            name = self.ns(logical)
            core.create_namespace(
                client.V1Namespace(
                    metadata=client.V1ObjectMeta(
                        name=name, labels=self.namespace_labels(self.model, logical)
                    )
                )
            )
            for sa in ACCOUNTS:
                core.create_namespaced_service_account(
                    name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
                )
        for logical, bot in self.model.bots.items():
            username = self.bot(logical)
            self.system.conduit.add_user(username, bot=True)
            token = self.system.conduit.add_token(username)
            core.create_namespaced_secret(
                SYSTEM,
                client.V1Secret(
                    metadata=client.V1ObjectMeta(name=f"{username}-token"),
                    data={"token": base64.b64encode(token.encode()).decode()},
                ),
            )
            self.cluster.custom.create_cluster_custom_object(
                G,
                V,
                resources.BOT_PLURAL,
                {
                    "apiVersion": f"{G}/{V}",
                    "kind": resources.BOT_KIND,
                    "metadata": {"name": username},
                    "spec": {
                        "username": username,
                        "tokenSecretRef": {"name": f"{username}-token"},
                        "namespaceSelector": {"matchLabels": self.bot_selector(bot)},
                    },
                },
            )

    # applying steps

    def apply(self, step: Step) -> bool:
        """Apply one step; False when it does not apply to the current state (skipped)."""
        kind = step["kind"]
        handler: Callable[[Step], bool] = getattr(self, f"_{kind}")
        done = handler(step)
        if done:
            self.log.append(json.dumps(step, sort_keys=True))
        return done

    def _operator_stop(self, step: Step) -> bool:
        self.dark_revoked += self._revoked_for_bots()
        self.system.stop_operator()
        return True

    def _revoked_for_bots(self) -> float:
        """Leases the running operator has revoked for a bot not Ready (its metric)."""
        if self.system.operator is None:
            return 0.0
        recorded = self.system.operator.process.metrics  # type: ignore[attr-defined]
        return sum(
            value
            for labels, value in metrics.samples(recorded, "phabmesh_leases_revoked_total")
            if labels.get("reason") == resources.BOT_NOT_READY
        )

    def _phabricator_down(self, step: Step) -> bool:
        """Phabricator down until the next check; once the running operator has found every
        bot Unknown, so that the restart after this finds them so."""
        if self.system.operator is None:
            return False
        self.system.conduit.down = True
        names = [self.bot(name) for name in BOTS]

        def unknown() -> bool:
            for name in names:
                body = self.cluster.custom.get_cluster_custom_object(
                    G, V, resources.BOT_PLURAL, name
                )
                ready = next(
                    (c for c in (body.get("status") or {}).get("conditions") or []
                     if c["type"] == "Ready"),
                    {},
                )  # fmt: skip
                if ready.get("status") != "Unknown":
                    return False
            return True

        wait_for(unknown, timeout=30, what="every bot Unknown while Phabricator is down")
        # From here on (a check that was under way when it went down, and found a bot
        # disabled just before, has landed by now): no lease may go for a bot's sake.
        self.dark = True
        self.dark_revoked = -self._revoked_for_bots()
        self.counts["restarts while Phabricator was down"] += 1
        return True

    def _operator_start(self, step: Step) -> bool:
        if self.system.operator is not None:
            return False
        time.sleep(max(float(step.get("down") or 0.0), SHORT_DOWN))
        self.system.start_operator()
        return True

    def _pod_create(self, step: Step) -> bool:
        key = (step["ns"], step["pod"])
        if key in self.model.pods:
            return False
        meshed = bool(step["meshed"])
        pod = Pod(
            sa=step["sa"],
            app=step["app"],
            meshed=meshed,
            control_plane=(
                step["control_plane"]
                if meshed
                else CONTROL_PLANE
                if step.get("label_only")
                else None
            ),
            node=bool(step["node"]),
        )
        labels = {"app": pod.app}
        if pod.control_plane:
            labels["linkerd.io/control-plane-ns"] = pod.control_plane
        if step.get("label_only"):
            self.counts["label-only pods"] += 1
        init = (
            [
                client.V1Container(
                    name="linkerd-proxy",
                    image="cr.l5d.io/linkerd/proxy:edge",
                    restart_policy="Always",
                )
            ]
            if meshed
            else None
        )
        created = self.cluster.core.create_namespaced_pod(
            self.ns(key[0]),
            client.V1Pod(
                metadata=client.V1ObjectMeta(name=key[1], labels=labels),
                spec=client.V1PodSpec(
                    service_account_name=pod.sa,
                    node_name="node-a" if pod.node else None,
                    # A pod without a node stays unbound: no scheduler by this name runs, so
                    # the control plane's does not bind it to a KWOK node, which would run it
                    # while the model says Pending.
                    scheduler_name=None if pod.node else "phabmesh-churn-unscheduled",
                    containers=[client.V1Container(name="app", image="registry.invalid/app:1")],
                    init_containers=init,
                ),
            ),
        )
        pod.uid = created.metadata.uid
        self.model.pods[key] = pod
        self.touched.add(("pod", *key))
        if step["running"]:
            self._set_phase(key, "Running")
        return True

    def _set_phase(self, key: tuple[str, str], phase: str) -> None:
        self.cluster.core.patch_namespaced_pod_status(
            key[1], self.ns(key[0]), {"status": {"phase": phase}}
        )
        self.model.pods[key].phase = phase

    def _pod_phase(self, step: Step) -> bool:
        key = (step["ns"], step["pod"])
        pod = self.model.pods.get(key)
        phase = step["phase"]
        # The kubelet's transitions only: Pending -> anything, Running -> finished.
        if pod is None or pod.terminating or pod.phase in ("Succeeded", "Failed"):
            return False
        if pod.phase == phase:
            return False
        self._set_phase(key, phase)
        self.touched.add(("pod", *key))
        return True

    def _pod_delete(self, step: Step) -> bool:
        key = (step["ns"], step["pod"])
        pod = self.model.pods.get(key)
        if pod is None or pod.terminating:
            return False
        self.cluster.core.delete_namespaced_pod(key[1], self.ns(key[0]))
        self.touched.add(("pod", *key))
        # With a node and not finished, it stays Terminating (no kubelet here to finish it);
        # without a node, or finished, the API server deletes it at once.
        if pod.node and pod.phase not in ("Succeeded", "Failed"):
            pod.terminating = True
        else:
            del self.model.pods[key]
        return True

    def _pod_force_delete(self, step: Step) -> bool:
        key = (step["ns"], step["pod"])
        if key not in self.model.pods:
            return False
        self.cluster.core.delete_namespaced_pod(key[1], self.ns(key[0]), grace_period_seconds=0)
        del self.model.pods[key]
        self.touched.add(("pod", *key))
        return True

    def _binding_body(self, ns: str, name: str, binding: Binding) -> dict[str, Any]:
        real_ns = self.ns(ns)

        def fill(value: str) -> str:
            return value.replace("@ns", real_ns)

        spec: dict[str, Any] = {
            "botRef": {"name": self.bot(binding.bot)},
            "credentialTTL": binding.ttl,
            "allowedMethods": list(binding.methods),
        }
        if binding.refs:
            spec["identityRefs"] = [{**r, "name": fill(r["name"])} for r in binding.refs]
        if binding.identities:
            spec["identities"] = [fill(i) for i in binding.identities]
        if binding.selector:
            spec["podSelector"] = binding.selector
        return {
            "apiVersion": f"{G}/{V}",
            "kind": resources.BINDING_KIND,
            "metadata": {"name": name},
            "spec": spec,
        }

    @staticmethod
    def _binding_from(step: Step) -> Binding:
        return Binding(
            bot=step["bot"],
            refs=list(step["refs"]),
            identities=list(step["identities"]),
            selector=step["selector"],
            ttl=step["ttl"],
            methods=tuple(step["methods"]),
        )

    def _binding_create(self, step: Step) -> bool:
        key = (step["ns"], step["binding"])
        if key in self.model.bindings:
            return False
        binding = self._binding_from(step)
        if not binding.refs and not binding.identities:
            binding.refs = [{"kind": "ServiceAccount", "name": "sa-1"}]
        self.cluster.custom.create_namespaced_custom_object(
            G, V, self.ns(key[0]), resources.BINDING_PLURAL, self._binding_body(*key, binding)
        )
        self.model.bindings[key] = binding
        self.touched.add(("binding", *key))
        return True

    def _binding_delete(self, step: Step) -> bool:
        key = (step["ns"], step["binding"])
        if key not in self.model.bindings:
            return False
        self.cluster.custom.delete_namespaced_custom_object(
            G, V, self.ns(key[0]), resources.BINDING_PLURAL, key[1]
        )
        del self.model.bindings[key]
        self.touched.add(("binding", *key))
        return True

    def _binding_edit(self, step: Step) -> bool:
        key = (step["ns"], step["binding"])
        old = self.model.bindings.get(key)
        if old is None:
            return False
        field, value = step["field"], step["value"]
        if field == "methods":
            value = tuple(value)
        binding = dataclasses.replace(old, **{field: value})
        if not binding.refs and not binding.identities:
            return False  # a binding always names someone here
        if field == "ttl" and resources.parse_duration(value) < resources.parse_duration(old.ttl):
            self.counts["ttl shrinks"] += 1
        body = self._binding_body(*key, binding)
        custom, ns = self.cluster.custom, self.ns(key[0])

        def replace() -> None:
            current = custom.get_namespaced_custom_object(
                G, V, ns, resources.BINDING_PLURAL, key[1]
            )
            current["spec"] = body["spec"]
            custom.replace_namespaced_custom_object(
                G, V, ns, resources.BINDING_PLURAL, key[1], current
            )

        _retry_conflicts(replace)
        self.model.bindings[key] = binding
        self.touched.add(("binding", *key))
        return True

    def _bot_selector(self, step: Step) -> bool:
        bot = self.model.bots[step["bot"]]
        if bot.selector_extra == step["extra"]:
            return False
        bot.selector_extra = dict(step["extra"])
        name = self.bot(step["bot"])
        custom = self.cluster.custom

        def replace() -> None:
            current = custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, name)
            current["spec"]["namespaceSelector"] = {"matchLabels": self.bot_selector(bot)}
            custom.replace_cluster_custom_object(G, V, resources.BOT_PLURAL, name, current)

        _retry_conflicts(replace)
        self.touched.add(("bot", step["bot"]))
        return True

    def _bot_disabled(self, step: Step) -> bool:
        bot = self.model.bots[step["bot"]]
        if bot.disabled == step["disabled"]:
            return False
        bot.disabled = bool(step["disabled"])
        username = self.bot(step["bot"])
        if bot.disabled:
            self.system.conduit.disable_user(username)
        else:
            self.system.conduit.enable_user(username)
        self.touched.add(("bot", step["bot"]))
        return True

    def _namespace_labels(self, step: Step) -> bool:
        ns = step["ns"]
        if self.model.namespaces[ns] == step["labels"]:
            return False
        self.model.namespaces[ns] = dict(step["labels"])
        core, name = self.cluster.core, self.ns(ns)

        def replace() -> None:
            current = core.read_namespace(name)
            current.metadata.labels = {
                **{
                    k: v
                    for k, v in current.metadata.labels.items()
                    if k.startswith("kubernetes.io/")
                },
                **self.namespace_labels(self.model, ns),
            }
            core.replace_namespace(name, current)

        _retry_conflicts(replace)
        self.touched.add(("namespace", ns))
        return True

    # checks

    def _leases(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        for logical in NAMESPACES:
            items += self.cluster.custom.list_namespaced_custom_object(
                G, V, self.ns(logical), resources.CREDENTIAL_PLURAL
            )["items"]
        return items

    def _lease_problems(self) -> list[str]:
        want = expected(self.model, self)
        active: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for item in self._leases():
            if (item.get("status") or {}).get("phase") == "Active":
                key = (item["spec"]["podUID"], item["spec"]["binding"])
                active.setdefault(key, []).append(item)
        names = {pod.uid: f"{ns}/{name}" for (ns, name), pod in self.model.pods.items()}
        problems = []
        for key, bot in sorted(want.items()):
            held = active.get(key, [])
            who = f"pod {names.get(key[0], key[0])} binding {key[1]}"
            if not held:
                problems.append(f"no Active lease for entitled {who}")
            elif len(held) > 1:
                problems.append(f"{len(held)} Active leases for {who}")
            elif held[0]["spec"]["bot"] != self.bot(bot):
                problems.append(
                    f"the lease of {who} is for bot {held[0]['spec']['bot']}, "
                    f"the binding's bot is {self.bot(bot)}"
                )
        for key, held in sorted(active.items()):
            if key not in want:
                who = f"pod {names.get(key[0], key[0] + ' (gone)')} binding {key[1]}"
                problems.append(
                    f"Active lease {held[0]['metadata']['name']} for {who}: not entitled"
                )
        return problems

    def settle(self) -> list[str]:
        """Wait until the leases are what the oracle says (twice in a row); else the problems."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        good = 0
        problems: list[str] = []
        while time.monotonic() < deadline:
            problems = self._lease_problems()
            good = good + 1 if not problems else 0
            if good >= 2:
                return []
            time.sleep(0.5)
        return problems

    def check(self) -> list[str]:
        dark_problems = []
        if self.dark:
            # Phabricator was only unreachable: no lease may have gone for its bot's sake,
            # across the operator's restart too (the bots' status said Unknown).
            revoked = self.dark_revoked + self._revoked_for_bots()
            if revoked:
                dark_problems.append(
                    f"{revoked:g} lease(s) revoked BotNotReady while Phabricator was only down"
                )
            self.dark = False
        self.system.conduit.down = False  # checks call Phabricator through the gateway
        if dark_problems:
            return dark_problems
        if self.system.operator is None:
            self.system.start_operator()
        problems = self.settle()
        if problems:
            return problems
        leases = {
            (x["spec"]["podUID"], x["spec"]["binding"]): x
            for x in self._leases()
            if (x.get("status") or {}).get("phase") == "Active"
        }
        current = {key: x["metadata"]["uid"] for key, x in leases.items()}
        problems += self._continuity(current)
        # The credentials of earlier checks first, before this check's exchanges replace them.
        problems += self._old_credentials(current)
        problems += self._exchanges(current)
        self.leases_before = current
        self.touched = set()
        return problems

    def _continuity(self, current: dict[tuple[str, str], str]) -> list[str]:
        """A lease whose pod, binding, bot and namespace nothing touched was never re-issued."""
        problems = []
        for (ns, pod_name), pod in self.model.pods.items():
            for (bns, bname), binding in self.model.bindings.items():
                key = (pod.uid, bname)
                if bns != ns or key not in current or key not in self.leases_before:
                    continue
                if {("pod", ns, pod_name), ("binding", ns, bname), ("bot", binding.bot)} & (
                    self.touched
                ) or ("namespace", ns) in self.touched:
                    continue
                if current[key] != self.leases_before[key]:
                    problems.append(
                        f"pod {ns}/{pod_name} binding {bname}: lease re-issued though "
                        "nothing about it changed"
                    )
        return problems

    def _token(self, ns: str, name: str, pod: Pod) -> str:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=["phabmesh.io"],
                expiration_seconds=600,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=name, uid=pod.uid
                ),
            )
        )
        answer = self.cluster.core.create_namespaced_service_account_token(
            pod.sa, self.ns(ns), request
        )
        return str(answer.status.token)

    def _exchange(self, token: str, binding: str) -> requests.Response:
        return requests.post(
            f"http://127.0.0.1:{self.system.endpoint_port}/v1/credentials",
            headers={"Authorization": f"Bearer {token}"},
            params={"binding": binding},
            timeout=10,
        )

    def _whoami(self, credential: str) -> dict[str, Any]:
        answer = requests.post(
            f"http://127.0.0.1:{self.system.gateway_port}/api/user.whoami",
            data={"api.token": credential},
            timeout=10,
        )
        body: dict[str, Any] = answer.json()
        return body

    def _exchanges(self, current: dict[tuple[str, str], str]) -> list[str]:
        problems = []
        want = expected(self.model, self)
        for (ns, name), pod in sorted(self.model.pods.items()):
            if pod.terminating:
                continue
            token = self._token(ns, name, pod)
            for bname in BINDINGS:
                key = (pod.uid, bname)
                who = f"pod {ns}/{name} binding {bname}"
                if key not in want:
                    self.counts["refusals"] += 1

                    def refused(token: str = token, bname: str = bname) -> bool:
                        return self._exchange(token, bname).status_code != 200

                    if not _eventually(refused):
                        problems.append(f"{who}: exchange succeeded, not entitled")
                    continue
                binding = self.model.bindings[(ns, bname)]

                def exchanged(token: str = token, bname: str = bname) -> requests.Response | None:
                    answer = self._exchange(token, bname)
                    return answer if answer.status_code == 200 else None

                try:
                    answer = wait_for(exchanged, timeout=10, what="an exchange")
                except AssertionError:
                    problems.append(f"{who}: exchange refused, entitled")
                    continue
                self.counts["exchanges"] += 1
                credential = str(answer.json()["credential"])

                def confirmed(credential: str = credential) -> dict[str, Any] | None:
                    # The gateway's own lease watch may not have the new lease yet.
                    reply = self._whoami(credential)
                    return None if reply.get("error_code") == "ERR-INVALID-AUTH" else reply

                reply = _eventually(confirmed) or self._whoami(credential)
                problems += self._judge_call(who, reply, binding)
                self.credentials[key] = Credential(
                    credential, current.get(key, ""), _expiry(credential), time.time()
                )
        return problems

    def _judge_call(self, who: str, reply: dict[str, Any], binding: Binding) -> list[str]:
        if method_allowed("user.whoami", binding.methods):
            if reply.get("error_code") is not None:
                return [f"{who}: gateway refused a new credential: {reply.get('error_info')}"]
            acting = (reply.get("result") or {}).get("userName")
            self.counts["calls"] += 1
            if acting != self.bot(binding.bot):
                return [
                    f"{who}: the gateway acted as {acting}, the binding's bot is "
                    f"{self.bot(binding.bot)}"
                ]
        elif reply.get("error_code") != "ERR-CONDUIT-CORE":
            return [f"{who}: user.whoami not allowed, yet the gateway answered {reply}"]
        return []

    def _old_credentials(self, current: dict[tuple[str, str], str]) -> list[str]:
        problems = []
        names = {pod.uid: f"{ns}/{name}" for (ns, name), pod in self.model.pods.items()}
        namespaces = {pod.uid: ns for (ns, _), pod in self.model.pods.items()}
        for key, old in list(self.credentials.items()):
            # Good until the earlier of its own expiry and its issue time plus the binding's
            # credentialTTL now (the CRD's documentation): a TTL shrunk since shortens it.
            binding = self.model.bindings.get((namespaces.get(key[0], ""), key[1]))
            end = old.expires
            if binding is not None:
                end = min(end, old.issued + resources.parse_duration(binding.ttl).total_seconds())
            if abs(end - time.time()) < 5:
                continue  # (about to) end: either answer is right
            if end < time.time():
                if old.expires < time.time() - 60:
                    del self.credentials[key]
                continue  # ended: refused for that alone
            good = current.get(key) == old.lease_uid and bool(old.lease_uid)
            if good and end < old.expires:
                self.counts["shortened by a TTL, still good"] += 1
            who = f"pod {names.get(key[0], key[0] + ' (gone)')} binding {key[1]}"

            def settled(token: str = old.token, good: bool = good) -> bool:
                refused = self._whoami(token).get("error_code") == "ERR-INVALID-AUTH"
                return refused != good

            self.counts["old accepted" if good else "old refused"] += 1
            if not _eventually(settled):
                state = "refused" if good else "accepted"
                problems.append(f"{who}: the gateway {state} an earlier credential")
        return problems


def _eventually(predicate: Callable[[], T], timeout: float = 10.0) -> T | None:
    """The predicate's value once truthy (the watches behind each answer catch up), or None."""
    try:
        return wait_for(predicate, timeout=timeout, interval=0.2)
    except AssertionError:
        return None


def _retry_conflicts(write: Callable[[], None]) -> None:
    """Read-modify-write, again when the operator's status write came in between (409)."""
    for _ in range(10):
        try:
            write()
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    write()


def _expiry(credential: str) -> float:
    if phorge.looks_like(credential):  # the default format: its expiry is in the clear
        return float(phorge.parse(credential).expiry)
    payload = credential.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"])


# -- driving and reporting ------------------------------------------------------------------


def replay(system: System, seed: int, steps: list[Step]) -> tuple[list[str], Run]:
    """Apply ``steps`` in a fresh run; (problems at the first failing check, the run)."""
    run = Run(system, seed)
    run.setup()
    try:
        for step in steps:
            if step["kind"] == "check":
                run.log.append(json.dumps(step))
                run.counts["checks"] += 1
                run.counts["entitled"] += len(expected(run.model, run))
                problems = run.check()
                if problems:
                    return problems, run
            elif run.apply(step):
                run.counts["steps"] += 1
        return [], run
    finally:
        system.conduit.down = False  # a run that failed while Phabricator was down
        if system.operator is None:
            system.start_operator()


def shrink(system: System, seed: int, steps: list[Step]) -> list[Step]:
    """Drop chunks of steps while the replay still fails, within SHRINK_SECONDS."""
    deadline = time.monotonic() + SHRINK_SECONDS
    current = steps
    chunk = max(1, len(current) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i = 0
        shrunk = False
        while i < len(current) and time.monotonic() < deadline:
            candidate = current[:i] + current[i + chunk :]
            if not any(s["kind"] == "check" for s in candidate):
                candidate.append({"kind": "check"})
            if replay(system, seed, candidate)[0]:
                current, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return current


def _index_of_check(steps: list[Step], number: int) -> int:
    seen = 0
    for i, step in enumerate(steps):
        if step["kind"] == "check":
            seen += 1
            if seen == number:
                return i
    return len(steps) - 1


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    conduit = ConduitServer()
    conduit.start()
    with devcluster.ControlPlane(tmp_path_factory.mktemp("controlplane")) as plane:
        # No controllers: the pod garbage collector would delete the pods bound to a node
        # that does not exist, behind the model's back. phabmesh revokes what is deleted.
        plane.stop_controller_manager()
        cluster = Cluster(plane)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--all", "crd", "--timeout=60s")
        try:
            cluster.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM))
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
        made = System(plane, conduit)
        made.start_operator()
        made.start_gateway()
        try:
            yield made
        finally:
            made.stop_operator()
            if made.gateway is not None:
                made.gateway.stop()
            conduit.stop()


# Longer runs and shrinking take longer than the suite's default per-test timeout.
@pytest.mark.timeout(300 + 5 * STEPS + 3 * SHRINK_SECONDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_churn(system: System, seed: int) -> None:
    steps = generate(seed, STEPS, BURST)
    problems, run = replay(system, seed, steps)
    print(f"churn seed {seed}: {dict(sorted(run.counts.items()))}")
    if not problems:
        return
    report = [f"churn seed {seed} failed (PHABMESH_CHURN_SEEDS={seed} to rerun):", *problems]
    if SHRINK_SECONDS > 0:
        # Only the steps up to the failing check can matter.
        upto = steps[: _index_of_check(steps, run.counts["checks"]) + 1]
        smaller = shrink(system, seed, upto)
        problems, run = replay(system, seed, smaller)
        report += ["after shrinking:", *(problems or ["(the shrunk steps passed: flaky?)"])]
    report += ["steps applied (one JSON object each; checks after each burst):", *run.log]
    pytest.fail("\n".join(report), pytrace=False)
