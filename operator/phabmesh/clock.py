"""Time as the API server writes it: aware UTC, RFC 3339 to the second (``...Z``). Pure.

Every part that stamps or reads a time of an object takes its clock as a ``Clock``
(:func:`utcnow` unless a test injects another).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def format_time(value: datetime.datetime) -> str:
    """``value`` as an object's timestamp field holds it: ``2026-01-02T03:04:05Z``."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime.datetime | None:
    """A timestamp field's value as an aware time; None when it is not set."""
    if not isinstance(value, str) or not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
