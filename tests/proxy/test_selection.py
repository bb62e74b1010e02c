"""What the proxy selects, pure (proxy.selection): route, version, endpoint, ejection, fault;
and the retry condition table (proxy.retries.should_retry)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from composemesh.model.routing import (
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    RetryPolicy,
    ServiceRouting,
    StringMatch,
    WeightedSubset,
)
from composemesh.proxy.retries import Outcome, should_retry
from composemesh.proxy.selection import (
    MAX_EJECTION_S,
    Endpoint,
    EndpointPicker,
    OutlierDetector,
    draw_fault,
    pick_version,
    select_route,
)

N = 100_000


def route(name: str, *matches: HttpMatch, **weights: int) -> HttpRoute:
    dests = tuple(WeightedSubset(v, w) for v, w in (weights or {"v1": 1}).items())
    return HttpRoute(name=name, matches=matches, destinations=dests)


def routing(*routes: HttpRoute) -> ServiceRouting:
    return ServiceRouting(service="reviews", routes=routes)


def exact(v: str) -> StringMatch:
    return StringMatch("exact", v)


def prefix(v: str) -> StringMatch:
    return StringMatch("prefix", v)


def regex(v: str) -> StringMatch:
    return StringMatch("regex", v)


def chosen(r: ServiceRouting, method: str = "GET", path: str = "/", **headers: str) -> str | None:
    hit = select_route(r, method, path, {k.replace("_", "-"): v for k, v in headers.items()})
    return None if hit is None else hit.name


# --------------------------------------------------------------------------- select_route


def test_path_exact_prefix_regex() -> None:
    r = routing(
        route("exact", HttpMatch(path=exact("/reviews"))),
        route("prefix", HttpMatch(path=prefix("/api/"))),
        route("regex", HttpMatch(path=regex(r"/items/\d+"))),
        route("default"),
    )
    assert chosen(r, path="/reviews") == "exact"
    assert chosen(r, path="/reviews/1") == "default"  # exact is exact
    assert chosen(r, path="/api/x") == "prefix"
    assert chosen(r, path="/api") == "default"
    assert chosen(r, path="/items/42") == "regex"
    assert chosen(r, path="/items/42/x") == "default"  # a regex matches the whole path
    assert chosen(r, path="/x/items/42") == "default"


def test_query_string_is_ignored() -> None:
    r = routing(
        route("exact", HttpMatch(path=exact("/reviews"))),
        route("regex", HttpMatch(path=regex(r"/items/\d+"))),
        route("default"),
    )
    assert chosen(r, path="/reviews?user=jason") == "exact"
    assert chosen(r, path="/reviews?") == "exact"
    assert chosen(r, path="/items/7?page=2") == "regex"
    assert chosen(r, path="/items/?7") == "default"


def test_headers_exact_prefix_regex_and_missing() -> None:
    r = routing(
        route("exact", HttpMatch(headers=(("end-user", exact("jason")),))),
        route("prefix", HttpMatch(headers=(("x-group", prefix("beta-")),))),
        route("regex", HttpMatch(headers=(("x-id", regex("[0-9]+")),))),
        route("default"),
    )
    assert chosen(r, end_user="jason") == "exact"
    assert chosen(r, end_user="jason2") == "default"
    assert chosen(r, x_group="beta-7") == "prefix"
    assert chosen(r, x_group="alpha") == "default"
    assert chosen(r, x_id="123") == "regex"
    assert chosen(r, x_id="123a") == "default"
    assert chosen(r) == "default"  # a header that is missing matches nothing


def test_method() -> None:
    r = routing(route("post", HttpMatch(method="POST")), route("default"))
    assert chosen(r, method="POST") == "post"
    assert chosen(r, method="GET") == "default"


def test_and_within_a_match_or_between_matches() -> None:
    both = HttpMatch(path=prefix("/reviews"), headers=(("end-user", exact("jason")),))
    r = routing(
        route("and", both),
        route("or", HttpMatch(method="DELETE"), HttpMatch(path=exact("/admin"))),
        route("default"),
    )
    assert chosen(r, path="/reviews/1", end_user="jason") == "and"
    assert chosen(r, path="/reviews/1", end_user="bob") == "default"
    assert chosen(r, path="/other", end_user="jason") == "default"
    assert chosen(r, method="DELETE", path="/x") == "or"
    assert chosen(r, method="GET", path="/admin") == "or"
    assert chosen(r, method="GET", path="/x") == "default"


def test_first_match_wins() -> None:
    r = routing(
        route("first", HttpMatch(path=prefix("/a"))),
        route("second", HttpMatch(path=prefix("/a/b"))),
        route("default"),
    )
    assert chosen(r, path="/a/b/c") == "first"


def test_no_default_and_no_match_is_none() -> None:
    r = routing(route("only", HttpMatch(path=exact("/a"))))
    assert chosen(r, path="/b") is None
    assert chosen(routing()) is None


# --------------------------------------------------------------------------- pick_version


def test_pick_version_follows_the_weights() -> None:
    rng = random.Random(7)
    r = route("split", v1=80, v2=20, v3=0)
    counts = Counter(pick_version(r, rng) for _ in range(N))
    assert set(counts) == {"v1", "v2"}  # a 0 weight is never picked
    assert abs(counts["v1"] / N - 0.80) < 0.01
    assert abs(counts["v2"] / N - 0.20) < 0.01


def test_pick_version_uneven_weights() -> None:
    rng = random.Random(11)
    r = route("split", v1=0, v2=1, v3=3)
    counts = Counter(pick_version(r, rng) for _ in range(N))
    assert "v1" not in counts
    assert abs(counts["v3"] / N - 0.75) < 0.01


def test_pick_version_all_zero_is_none() -> None:
    assert pick_version(route("zero", v1=0, v2=0), random.Random(1)) is None
    empty = HttpRoute(name="empty", matches=(), destinations=())
    assert pick_version(empty, random.Random(1)) is None


# --------------------------------------------------------------------------- EndpointPicker

A = Endpoint("a", "v1", "10.0.0.1")
B = Endpoint("b", "v1", "10.0.0.2")
C = Endpoint("c", "v2", "10.0.0.3")


def test_round_robin_rotates() -> None:
    picker = EndpointPicker("round_robin")
    assert [picker.pick([A, B, C]) for _ in range(7)] == [A, B, C, A, B, C, A]


def test_round_robin_skips_the_excluded() -> None:
    picker = EndpointPicker("round_robin")
    assert [picker.pick([A, B, C], exclude=(B,)) for _ in range(4)] == [A, C, A, C]
    assert picker.pick([A, B, C], exclude={A, B, C}) is None
    assert picker.pick([]) is None


def test_least_request_prefers_the_idle() -> None:
    picker = EndpointPicker("least_request", random.Random(3))
    picker.started(A)
    picker.started(A)
    picker.started(C)
    for _ in range(50):
        assert picker.pick([A, B, C]) == B
    picker.started(B)
    picker.started(B)
    assert picker.pick([A, B, C]) == C
    picker.finished(A)
    picker.finished(A)
    assert picker.pick([A, B, C]) == A
    assert picker.pick([A, B, C], exclude=(A,)) == C
    assert picker.in_flight(A) == 0
    picker.finished(A)  # more finished than started: never below zero
    assert picker.in_flight(A) == 0


def test_least_request_breaks_ties_at_random() -> None:
    picker = EndpointPicker("least_request", random.Random(5))
    counts = Counter(picker.pick([A, B, C]) for _ in range(3000))
    assert set(counts) == {A, B, C}
    assert all(800 < n < 1200 for n in counts.values())


def test_unknown_load_balancer() -> None:
    with pytest.raises(ValueError):
        EndpointPicker("random")


# --------------------------------------------------------------------------- OutlierDetector


class FakeClock:
    """Stands in for time.monotonic so that ejections can be timed exactly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(
    errors: int = 3, base: float = 10.0, percent: int = 100
) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    return OutlierDetector(OutlierPolicy(errors, base, percent), clock), clock


def fail(d: OutlierDetector, ep: Endpoint, times: int) -> None:
    for _ in range(times):
        d.record(ep, ok=False)


def test_ejects_after_n_consecutive_failures() -> None:
    d, _ = detector(errors=3)
    fail(d, A, 2)
    assert not d.is_ejected(A)
    fail(d, A, 1)
    assert d.is_ejected(A)
    assert not d.is_ejected(B)
    assert d.available([A, B]) == [B]


def test_a_success_resets_the_count() -> None:
    d, _ = detector(errors=3)
    fail(d, A, 2)
    d.record(A, ok=True)
    fail(d, A, 2)
    assert not d.is_ejected(A)
    fail(d, A, 1)
    assert d.is_ejected(A)


def test_returns_after_the_ejection_time_and_back_off_grows() -> None:
    d, clock = detector(errors=2, base=10.0)
    fail(d, A, 2)
    clock.now += 9.9
    assert d.is_ejected(A)
    clock.now += 0.1
    assert not d.is_ejected(A)
    assert d.available([A, B]) == [A, B]
    fail(d, A, 2)  # ejected a second time: twice as long
    clock.now += 19.9
    assert d.is_ejected(A)
    clock.now += 0.1
    assert not d.is_ejected(A)
    fail(d, A, 2)  # third time: three times as long
    clock.now += 29.9
    assert d.is_ejected(A)
    clock.now += 0.1
    assert not d.is_ejected(A)


def test_back_off_is_capped() -> None:
    d, clock = detector(errors=1, base=100.0)
    assert MAX_EJECTION_S == 300.0
    for seconds in (100, 200, 300, 300, 300):
        fail(d, A, 1)  # fails again as soon as it is back
        clock.now += seconds - 0.1
        assert d.is_ejected(A)
        clock.now += 0.1
        assert not d.is_ejected(A)


def test_back_off_shrinks_while_healthy() -> None:
    d, clock = detector(errors=1, base=10.0)
    fail(d, A, 1)
    clock.now += 10
    fail(d, A, 1)  # x2
    clock.now += 20
    clock.now += 25  # two base periods back in service: the multiplier drops by two
    fail(d, A, 1)
    clock.now += 9.9
    assert d.is_ejected(A)
    clock.now += 0.1
    assert not d.is_ejected(A)


def test_failures_while_ejected_do_not_extend_it() -> None:
    d, clock = detector(errors=2, base=10.0)
    fail(d, A, 2)
    clock.now += 5
    fail(d, A, 5)
    clock.now += 5
    assert not d.is_ejected(A)


def test_max_ejection_percent_is_respected() -> None:
    eps = [Endpoint(f"n{i}", "v1", f"10.0.0.{i}") for i in range(10)]
    d, clock = detector(errors=1, percent=30)
    for ep in eps[:5]:
        fail(d, ep, 1)
        clock.now += 0.01
    assert all(d.is_ejected(ep) for ep in eps[:5])
    available = d.available(eps)
    assert available == eps[3:]  # the three ejected first stay out, the others serve
    assert len(available) == 7


def test_at_least_one_endpoint_stays() -> None:
    d, _ = detector(errors=1, percent=100)
    fail(d, A, 1)
    assert d.available([A]) == [A]
    fail(d, B, 1)
    assert d.available([A, B]) == [B]  # A was ejected first
    assert d.available([]) == []


def test_zero_percent_ejects_nothing() -> None:
    d, _ = detector(errors=1, percent=0)
    fail(d, A, 1)
    assert d.available([A, B]) == [A, B]


def test_no_policy_never_ejects() -> None:
    d = OutlierDetector(None, FakeClock())
    fail(d, A, 100)
    assert not d.is_ejected(A)
    assert d.available([A, B]) == [A, B]


def test_retain_forgets_endpoints_that_are_gone() -> None:
    d, _ = detector(errors=2)
    fail(d, A, 1)
    d.retain([B])
    fail(d, A, 1)
    assert not d.is_ejected(A)  # its first failure was forgotten


# --------------------------------------------------------------------------- should_retry

ALL = frozenset({"5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx"})


def policy(*on: str, attempts: int = 2, non_idempotent: bool = False) -> RetryPolicy:
    return RetryPolicy(
        attempts=attempts, retry_on=frozenset(on), retry_non_idempotent=non_idempotent
    )


S500, S502, S503, S504, S409, S404, S200 = (
    Outcome(status=s) for s in (500, 502, 503, 504, 409, 404, 200)
)
CONNECT = Outcome(error="connect-failure")
RESET = Outcome(error="reset")
TIMEOUT = Outcome(error="timeout")


@pytest.mark.parametrize(
    ("on", "outcome", "expected"),
    [
        (("5xx",), S500, True),
        (("5xx",), S503, True),
        (("5xx",), Outcome(status=599), True),
        (("5xx",), S409, False),
        (("5xx",), S404, False),
        (("5xx",), S200, False),
        (("5xx",), RESET, True),
        (("5xx",), TIMEOUT, True),
        (("5xx",), CONNECT, True),
        (("gateway-error",), S500, False),
        (("gateway-error",), S502, True),
        (("gateway-error",), S503, True),
        (("gateway-error",), S504, True),
        (("gateway-error",), CONNECT, True),
        (("gateway-error",), TIMEOUT, True),
        (("gateway-error",), RESET, False),
        (("connect-failure",), CONNECT, True),
        (("connect-failure",), RESET, False),
        (("connect-failure",), S503, False),
        (("reset",), RESET, True),
        (("reset",), CONNECT, False),
        (("reset",), S500, False),
        (("retriable-4xx",), S409, True),
        (("retriable-4xx",), S404, False),
        (("retriable-4xx",), S500, False),
        ((), S503, False),
        ((), CONNECT, False),
        (tuple(ALL), Outcome(), False),
        (tuple(ALL), S200, False),
    ],
)
def test_retry_on(on: tuple[str, ...], outcome: Outcome, expected: bool) -> None:
    assert should_retry(policy(*on), "GET", 1, outcome) is expected


def test_attempts_are_counted() -> None:
    p = policy("5xx", attempts=2)
    assert should_retry(p, "GET", 1, S503)
    assert should_retry(p, "GET", 2, S503)
    assert not should_retry(p, "GET", 3, S503)
    assert not should_retry(policy("5xx", attempts=0), "GET", 1, S503)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_non_idempotent_requests_are_retried_only_when_nothing_was_sent(method: str) -> None:
    p = policy(*ALL)
    assert not should_retry(p, method, 1, S503)
    assert not should_retry(p, method, 1, RESET)
    assert not should_retry(p, method, 1, TIMEOUT)
    assert should_retry(p, method, 1, CONNECT)
    assert not should_retry(policy("reset"), method, 1, CONNECT)  # still needs retry_on
    allowed = policy(*ALL, non_idempotent=True)
    assert should_retry(allowed, method, 1, S503)
    assert should_retry(allowed, method, 1, RESET)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_requests_are_retried(method: str) -> None:
    assert should_retry(policy("5xx"), method, 1, S503)
    assert should_retry(policy("reset"), method, 1, RESET)


# --------------------------------------------------------------------------- draw_fault


def test_no_fault() -> None:
    assert draw_fault(None, random.Random(1)) == (0.0, None)
    assert draw_fault(FaultPolicy(), random.Random(1)) == (0.0, None)


def test_fault_percentages() -> None:
    rng = random.Random(13)
    fault = FaultPolicy(delay=FaultDelay(2.0, 10.0), abort=FaultAbort(503, 5.0))
    draws = [draw_fault(fault, rng) for _ in range(N)]
    delays = sum(1 for delay, _ in draws if delay == 2.0)
    aborts = sum(1 for _, status in draws if status == 503)
    assert {delay for delay, _ in draws} == {0.0, 2.0}
    assert {status for _, status in draws} == {None, 503}
    assert abs(delays / N - 0.10) < 0.01
    assert abs(aborts / N - 0.05) < 0.01
    both = sum(1 for delay, status in draws if delay and status)
    assert abs(both / N - 0.005) < 0.01  # drawn independently


def test_fault_at_0_and_100_percent() -> None:
    rng = random.Random(1)
    always = FaultPolicy(delay=FaultDelay(0.5, 100.0), abort=FaultAbort(500, 100.0))
    never = FaultPolicy(delay=FaultDelay(0.5, 0.0), abort=FaultAbort(500, 0.0))
    assert all(draw_fault(always, rng) == (0.5, 500) for _ in range(1000))
    assert all(draw_fault(never, rng) == (0.0, None) for _ in range(1000))


def test_fractional_percent() -> None:
    rng = random.Random(17)
    fault = FaultPolicy(abort=FaultAbort(500, 0.5))
    aborts = sum(1 for _ in range(N) if draw_fault(fault, rng)[1] == 500)
    assert abs(aborts / N - 0.005) < 0.01
    assert aborts > 0


def test_a_version_without_endpoints_gives_its_share_to_the_others() -> None:
    import random as _random

    from composemesh.model.routing import HttpRoute, WeightedSubset
    from composemesh.proxy.selection import pick_version as _pick

    route = HttpRoute(name="default", matches=(), destinations=(
        WeightedSubset("v1", 0), WeightedSubset("v2", 50), WeightedSubset("v3", 50)))
    rng = _random.Random(3)
    picks = {_pick(route, rng, frozenset({"v1", "v2"})) for _ in range(500)}
    assert picks == {"v2"}
    assert _pick(route, rng, frozenset({"v1"})) is None
    assert _pick(route, rng, frozenset()) is None
