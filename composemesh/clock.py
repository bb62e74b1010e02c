"""The wall clock, in one place: every component that reads the time takes a ``Clock``
(so tests pass a fixed one) and defaults to ``system_clock``."""
from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """Now, timezone-aware in UTC (certificates compare against aware datetimes)."""
    return datetime.now(UTC)
