"""One retry policy for every loop of phabmesh that waits before trying again.

Retry number ``n`` (1, 2, ...) waits between half of and all of ``first * 2**(n-1)``
seconds, at most ``cap`` (jitter, so that many clients that failed together do not retry
together, and no retry waits longer than ``cap``).
When the other side said how long to wait (``Retry-After`` on a 429 or 503: the API
server's priority and fairness, Phabricator, phabmesh's own credential endpoint and
gateway), that is waited instead, up to ``cap``.

Used by the Kubernetes client, the watches, the Conduit client, the controller's per-pod
retries, the supervised tasks, the webhook's process, and the pod side (the agent and
``phabmesh credential --watch``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Backoff:
    first: float
    cap: float

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap)
        exponent = min(max(attempt, 1) - 1, 32)
        return min(self.first * 2.0**exponent, self.cap) * (1 - jitter() / 2)


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
