"""Bytes in flight, bounded: request bodies, and answers from Phabricator.

A request reserves what it will hold (its ``Content-Length``, or each chunk as it is read)
before holding it, and gives it back when its answer is sent. A reservation past the limit,
or past one source's share of it, is refused at once (the caller answers 503 or 429 with a
Retry-After), never waited on. Part of the budget (``small_reserve``) is kept for small
reservations, so a flood of large bodies never refuses a small call.
"""

from __future__ import annotations

import collections
import dataclasses

from phabmesh.gateway.offload import Busy


class Budget:
    def __init__(
        self, name: str, setting: str, limit: int, share: int, small: int, small_reserve: int
    ) -> None:
        self.name = name  # what it bounds, for the refusal: "request bodies"
        self.setting = setting  # the setting that sizes it, for the refusal
        self.limit = limit
        self.share = share
        self.small = small  # reservations up to this size are small
        self.small_reserve = small_reserve
        self.used = 0
        self._by_source: collections.Counter[str] = collections.Counter()

    def take(self, source: str, size: int, whole: int | None = None) -> None:
        """Reserve ``size`` bytes for ``source``, or raise :class:`Busy`. ``whole``: the size
        of the whole that ``size`` is part of (a chunk of a body), None when unknown; a
        reservation is small only when the whole is known to be."""
        large = (whole if whole is not None else self.small + 1) > self.small
        ceiling = self.limit - self.small_reserve if large else self.limit
        if large and self._by_source[source] + size > self.share:
            raise Busy(
                429,
                f"phabmesh: this client already has {self._by_source[source]} bytes of "
                f"{self.name} in flight, its share of {self.setting}; retry shortly",
            )
        if self.used + size > ceiling:
            raise Busy(
                503,
                f"phabmesh: the gateway has {self.used} bytes of {self.name} in flight "
                f"({self.setting}: {self.limit}); retry shortly",
            )
        self.used += size
        self._by_source[source] += size

    def room(self, source: str) -> int:
        """The most a large reservation of ``source`` can take now (0: none)."""
        ceiling = self.limit - self.small_reserve
        return max(0, min(self.share - self._by_source[source], ceiling - self.used))

    def give(self, source: str, size: int) -> None:
        self.used -= size
        self._by_source[source] -= size
        if self._by_source[source] <= 0:
            del self._by_source[source]


@dataclasses.dataclass
class Held:
    """What one request holds of each budget; :meth:`release` gives it all back."""

    source: str
    taken: dict[Budget, int] = dataclasses.field(default_factory=dict)

    def take(self, budget: Budget, size: int, whole: int | None = None) -> None:
        budget.take(self.source, size, whole)
        self.taken[budget] = self.taken.get(budget, 0) + size

    def give(self, budget: Budget, size: int) -> None:
        """Give back ``size`` of what was taken from ``budget`` (reserved, then not needed)."""
        if size < 0:
            raise ValueError(f"cannot give back {size} bytes")
        size = min(size, self.taken.get(budget, 0))
        if size:
            budget.give(self.source, size)
            self.taken[budget] -= size

    def release(self) -> None:
        taken, self.taken = self.taken, {}
        for budget, size in taken.items():
            budget.give(self.source, size)
