"""One retry policy for every loop of phabmesh that waits before trying again.

Retry number ``n`` (1, 2, ...) waits between half of and all of ``first * 2**(n-1)``
seconds, at most ``cap`` (jitter, so that many clients that failed together do not retry
together, and no retry waits longer than ``cap``).
When the other side said how long to wait (``Retry-After`` on a 429 or 503: the API
server's priority and fairness, Phabricator, phabmesh's own credential endpoint and
gateway), that is waited instead, up to ``cap``.

The policy is a process's settings: ``PHABMESH_RETRY_FIRST`` and ``PHABMESH_RETRY_CAP``
(:meth:`phabmesh.settings.Settings.backoff`; defaults 0.2 s and 30 s, what most loops used
before it was one setting). Each loop is given it when it is made; none reads it itself:

- the controller's per-pod lease-write retries, the supervised tasks
  (:mod:`phabmesh.tasks`), the webhook's process restarts, the Conduit client, and on the
  pod side the agent and ``phabmesh credential --watch`` (which read the two variables
  from their own environment, :func:`phabmesh.settings.retry_policy`): the policy as it is;
- the retries inside one Kubernetes request, and the watches' reconnects: its
  :meth:`Backoff.short` form, a quarter of ``first`` doubling to a fifteenth of ``cap``
  (0.05 s to 2 s by default). A request's caller waits for its retries (the client makes
  ``attempts``, 4 by default: at most 0.35 s of backoff with the defaults), and while a
  watch is lost its readers fail closed (the gateway refuses credentials it cannot
  confirm): neither may wait as long as a background retry does. ``Retry-After`` is
  honoured there too, up to that shorter cap.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

DEFAULT_FIRST = 0.2  # seconds before the first retry (PHABMESH_RETRY_FIRST)
DEFAULT_CAP = 30.0  # seconds: no retry waits longer (PHABMESH_RETRY_CAP)
# The short form (Backoff.short): these fractions of first and of cap.
SHORT_FIRST = 1 / 4
SHORT_CAP = 1 / 15


@dataclasses.dataclass(frozen=True)
class Backoff:
    first: float
    cap: float
    # Where the random part comes from (0 <= jitter() < 1); tests fix it.
    jitter: Callable[[], float] = dataclasses.field(
        default=random.random, compare=False, repr=False
    )

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap)
        exponent = min(max(attempt, 1) - 1, 32)
        draw = (jitter or self.jitter)()
        return min(self.first * 2.0**exponent, self.cap) * (1 - draw / 2)

    def short(self) -> Backoff:
        """The form for waits something waits on (module docstring): a quarter of
        ``first``, at most a fifteenth of ``cap``."""
        return Backoff(self.first * SHORT_FIRST, self.cap * SHORT_CAP, self.jitter)


# The policy of the settings' defaults: for tools and tests that have no settings.
DEFAULT = Backoff(DEFAULT_FIRST, DEFAULT_CAP)


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds; None when absent or an HTTP date (the backoff's
    own delay applies then)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
