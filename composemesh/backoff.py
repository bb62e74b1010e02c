"""Retry pacing, in one place: how long to wait after ``failures`` failures in a row."""
from __future__ import annotations

import random
from collections.abc import Callable

Jitter = Callable[[], float]  # a uniform draw in [0, 1): random.random or a test's constant


def backoff_delay(failures: int, jitter: Jitter = random.random, initial: float = 0.5,
                  cap: float = 10.0) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubling from ``initial`` up to
    ``cap``, ±20 % so that proxies restarted together do not retry in step."""
    base = min(cap, initial * 2.0 ** max(0, failures - 1))
    return max(initial, min(cap, base * (0.8 + 0.4 * jitter())))
