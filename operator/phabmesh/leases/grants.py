"""Is a lease to be honoured now? Asked of the binding, the bot and the namespace as watches
show them, never of the lease alone.

A lease (PhabricatorCredential) is only as good as what granted it: phabmesh writes
leases, but a lease's own ``bot``, ``binding`` and ``expiresAt`` are not proof (anyone
allowed to write them could write any). So the credential endpoint and the gateway both
ask, per use:

- does the lease's binding exist, not being deleted, and still name the lease's bot?
- does that bot exist, and does its ``namespaceSelector`` select the lease's namespace?
- is the lease's identity the one of a ServiceAccount in the lease's namespace that the
  binding's subjects name?

and they cap a credential at the binding's current ``credentialTTL`` as well as at the
lease's ``expiresAt``. The answer is a revocation reason of :mod:`phabmesh.resources`, so
that refusals read like the operator's own revocations.

The functions and values here are pure; :class:`Grants` keeps them current from three
watches (bindings, bots, namespaces) and costs no API call per question.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from phabmesh import identity, matching, resources
from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer, Watched
from phabmesh.leases.view import LeaseView
from phabmesh.resources import resource_path


@dataclasses.dataclass(frozen=True, slots=True)
class BindingFacts:
    """What a binding grants now (None spec: unreadable, it grants nothing)."""

    bot: str
    spec: resources.BindingSpec | None
    deleting: bool
    allowed_methods: tuple[str, ...]
    require_client_id: bool

    @property
    def ttl(self) -> datetime.timedelta | None:
        return self.spec.ttl if self.spec is not None else None

    @classmethod
    def of(
        cls, bot: str, spec: resources.BindingSpec | None, deleting: bool = False
    ) -> BindingFacts:
        """The facts of a binding read elsewhere (the controller's world)."""
        return cls(
            bot=bot,
            spec=spec,
            deleting=deleting,
            allowed_methods=spec.allowed_methods if spec is not None else (),
            require_client_id=spec.require_client_id if spec is not None else False,
        )


def binding_facts(obj: JSON) -> BindingFacts:
    meta = obj.get("metadata") or {}
    raw = obj.get("spec") or {}
    spec, _ = resources.parse_binding_spec(obj)
    return BindingFacts(
        bot=str((raw.get("botRef") or {}).get("name") or ""),
        spec=spec,
        deleting=bool(meta.get("deletionTimestamp")),
        allowed_methods=tuple(str(m) for m in raw.get("allowedMethods") or ()),
        require_client_id=bool(raw.get("requireClientID", False)),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class BotFacts:
    """Where a bot may be used (None selector: its spec is unreadable, so nowhere), and
    which Secret holds its token."""

    selector: resources.LabelSelector | None
    secret_name: str
    secret_key: str

    @classmethod
    def of(cls, spec: resources.BotSpec | None) -> BotFacts:
        """The facts of a bot read elsewhere (the controller's world)."""
        if spec is None:
            return cls(None, "", "")
        return cls(spec.namespace_selector, spec.token_secret_ref.name, spec.token_secret_ref.key)


def bot_facts(obj: JSON) -> BotFacts:
    raw = obj.get("spec") or {}
    ref = raw.get("tokenSecretRef") or {}
    spec, _ = resources.parse_bot_spec(obj)
    selector = spec.namespace_selector if spec is not None else None
    return BotFacts(selector, str(ref.get("name", "")), str(ref.get("key") or "token"))


def namespace_labels(obj: JSON) -> Mapping[str, str]:
    return identity.labels_of((obj.get("metadata") or {}).get("labels") or {})


def refusal(
    lease: LeaseView,
    binding: BindingFacts | None,
    bot: BotFacts | None,
    labels: Mapping[str, str] | None,
    naming: identity.Naming,
) -> str | None:
    """Why ``lease`` is not to be honoured (a revocation reason), or None when it is.

    ``labels`` are the lease's namespace's (None: the namespace is not known).
    """
    if binding is None or binding.deleting:
        return resources.BINDING_DELETED
    if binding.spec is None:
        return resources.BINDING_NOT_READY
    if binding.bot != lease.bot:
        return resources.BOT_CHANGED
    if not bot_allows(bot, labels):
        return resources.BOT_NOT_ALLOWED
    subject = identity.parse_identity(lease.identity, naming)
    if subject is None or subject[1] != lease.namespace:
        return resources.NO_LONGER_MATCHED
    if not matching.subjects_match(binding.spec, lease.namespace, subject[0], naming):
        return resources.NO_LONGER_MATCHED
    return None


def bot_allows(bot: BotFacts | None, labels: Mapping[str, str] | None) -> bool:
    """The bot exists, its spec reads, and its namespaceSelector selects these namespace
    labels (None: the namespace is not known, so no)."""
    return (
        bot is not None
        and bot.selector is not None
        and labels is not None
        and matching.selector_matches(bot.selector, labels)
    )


def credential_end(
    lease: LeaseView, binding: BindingFacts, now: datetime.datetime
) -> datetime.datetime | None:
    """When a credential minted now for ``lease`` must end: the lease's expiresAt, and never
    more than the binding's current credentialTTL from now. None: no end can be given."""
    ttl = binding.ttl
    if lease.expires_at is None or ttl is None:
        return None
    return min(lease.expires_at, now + ttl)


class Grants:
    """Bindings, bots and namespaces' labels, each from one watch, to judge leases by.

    Watches the process already runs for bindings, bots or namespaces can be passed in, as
    informers or views (:meth:`~phabmesh.kube.informer.Informer.view`) that reduce with
    :func:`binding_facts`, :func:`bot_facts` and :func:`namespace_labels`; the others are
    made here, and :meth:`run` runs only those it made.
    """

    def __init__(
        self,
        client: KubeClient,
        naming: identity.Naming,
        *,
        bindings: Watched[BindingFacts] | None = None,
        bots: Watched[BotFacts] | None = None,
        namespaces: Watched[Mapping[str, str]] | None = None,
    ) -> None:
        self.naming = naming
        self._own: list[Informer[Any]] = []
        if bindings is None:
            bindings = Informer(
                client,
                resources.binding_path(None),
                binding_facts,
                name="grant-bindings",
            )
            self._own.append(bindings)
        if bots is None:
            bots = Informer(client, resources.bot_path(), bot_facts, name="grant-bots")
            self._own.append(bots)
        if namespaces is None:
            namespaces = Informer(
                client, resource_path("", "v1", "namespaces"), namespace_labels, name="namespaces"
            )
            self._own.append(namespaces)
        self.bindings = bindings
        self.bots = bots
        self.namespaces = namespaces

    async def run(self) -> None:
        if not self._own:  # every watch is the process's: nothing of its own to run
            await asyncio.Event().wait()
        await asyncio.gather(*(informer.run() for informer in self._own))

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in (self.bindings, self.bots, self.namespaces))

    @property
    def healthy(self) -> bool:
        """Every watch judged by is connected and synced: a judgement is current."""
        return all(i.healthy for i in (self.bindings, self.bots, self.namespaces))

    def binding(self, namespace: str, name: str) -> BindingFacts | None:
        return self.bindings.items.get(f"{namespace}/{name}")

    def bot_allows(self, bot: str, namespace: str) -> bool:
        """Whether bot ``bot`` may be used from ``namespace``, as the watches show it now."""
        return bot_allows(self.bots.items.get(bot), self.namespaces.items.get(namespace))

    def refusal(self, lease: LeaseView) -> str | None:
        return refusal(
            lease,
            self.binding(lease.namespace, lease.binding),
            self.bots.items.get(lease.bot),
            self.namespaces.items.get(lease.namespace),
            self.naming,
        )
