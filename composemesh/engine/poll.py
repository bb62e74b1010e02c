"""Asking again until an answer will do: the one loop behind every wait of the CLI (the
proxies' ACKs of a route, each step of a root rotation, readiness after `up`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    fetch: Callable[[], T],
    done: Callable[[T], bool],
    timeout: float,
    on_progress: Callable[[T], None] | None = None,
    *,
    interval: float,
    on_timeout: Callable[[T | None], BaseException],
    retry_on: tuple[type[Exception], ...] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fetch()`` every ``interval`` seconds until ``done`` says yes to an answer; that
    answer. Each answer goes to ``on_progress`` first. ``fetch`` runs at least once; once
    ``timeout`` seconds have gone by without a good answer, raises what ``on_timeout`` makes
    of the last answer (None if there was none). An exception of ``retry_on`` from ``fetch``
    is no answer, asked again; any other goes up at once."""
    deadline = clock() + timeout
    last: T | None = None
    while True:
        try:
            answer = fetch()
        except retry_on:
            pass
        else:
            last = answer
            if on_progress is not None:
                on_progress(answer)
            if done(answer):
                return answer
        if clock() >= deadline:
            raise on_timeout(last)
        sleep(interval)
