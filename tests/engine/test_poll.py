"""``engine.poll.poll_until``, the one loop behind the CLI's waits, on a fake clock: no sleep
is slept, time moves only when the loop sleeps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from composemesh.engine.poll import poll_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Late(Exception):
    def __init__(self, last: object) -> None:
        self.last = last


def answers(*values: object) -> Callable[[], object]:
    it: Iterator[object] = iter(values)

    def fetch() -> object:
        value = next(it)
        if isinstance(value, Exception):
            raise value
        return value

    return fetch


def test_it_returns_the_first_good_answer_after_reporting_each() -> None:
    clock, seen = Clock(), list[object]()
    got = poll_until(answers(1, 2, 3, 4), lambda n: n == 3, 10, seen.append, interval=0.5,
                     on_timeout=Late, clock=clock, sleep=clock.sleep)
    assert (got, seen, clock.slept) == (3, [1, 2, 3], [0.5, 0.5])


def test_it_asks_at_least_once_and_gives_up_with_the_last_answer() -> None:
    clock = Clock()
    with pytest.raises(Late) as info:
        poll_until(answers(*range(100)), lambda n: False, 1.0, interval=0.25, on_timeout=Late,
                   clock=clock, sleep=clock.sleep)
    assert info.value.last == 4 and clock.now == 101.0  # asked at 0, .25, .5, .75 and 1.0
    with pytest.raises(Late) as info:
        poll_until(answers("only"), lambda n: False, 0, interval=1, on_timeout=Late,
                   clock=clock, sleep=clock.sleep)
    assert info.value.last == "only"


def test_an_answer_that_fails_as_told_is_asked_again_and_others_go_up() -> None:
    clock, seen = Clock(), list[object]()
    fetch = answers(ConnectionError("not yet"), "up", "ready")
    got = poll_until(fetch, lambda s: s == "ready", 10, seen.append, interval=1,
                     on_timeout=Late, retry_on=(ConnectionError,), clock=clock, sleep=clock.sleep)
    assert (got, seen) == ("ready", ["up", "ready"])
    with pytest.raises(Late) as info:  # never an answer: the last is None
        poll_until(answers(*[ConnectionError()] * 10), bool, 2, interval=1, on_timeout=Late,
                   retry_on=(ConnectionError,), clock=clock, sleep=clock.sleep)
    assert info.value.last is None
    with pytest.raises(KeyError):
        poll_until(answers(KeyError("bug")), bool, 2, interval=1, on_timeout=Late,
                   retry_on=(ConnectionError,), clock=clock, sleep=clock.sleep)
