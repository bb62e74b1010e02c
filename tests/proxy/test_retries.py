"""Where a retry is decided (proxy.retries.Tries): every sequence of a request's tries as
plain calls, no sockets, no timers, no sleeps. The HTTP tests (test_http.py) run the same
rules through real connections."""

from __future__ import annotations

import pytest

from composemesh.model.routing import RetryPolicy
from composemesh.proxy.retries import (
    CONNECT_FAILURE_BODY,
    RETRY,
    TIMEOUT_BODY,
    Answer,
    Outcome,
    Respond,
    Tries,
)
from composemesh.proxy.stats import (
    CONNECT_FAILURE,
    NO_FLAGS,
    RETRIES_EXHAUSTED,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
)

RESET = Outcome(error="reset")
REFUSED = Outcome(error="connect-failure")


def tries(method: str = "GET", **policy: object) -> Tries:
    t = Tries(RetryPolicy(**policy), method)  # type: ignore[arg-type]
    t.begin()
    return t


def test_no_policy_means_one_try_and_the_failure_is_answered() -> None:
    t = tries()
    assert t.failed(REFUSED, CONNECT_FAILURE) == Answer(503, CONNECT_FAILURE_BODY,
                                                        CONNECT_FAILURE)
    assert t.responded(503, complete=True) == Respond(NO_FLAGS)  # no retries: passed on as is


def test_5xx_is_retried_as_many_times_as_the_policy_says_then_passed_on_as_exhausted() -> None:
    t = tries(attempts=2)
    assert t.responded(503, complete=True) is RETRY
    t.begin()
    assert t.responded(500, complete=True) is RETRY
    t.begin()
    assert t.attempt == 3
    assert t.responded(503, complete=True) == Respond(RETRIES_EXHAUSTED)


def test_a_success_after_retries_is_not_flagged() -> None:
    t = tries(attempts=2)
    assert t.responded(502, complete=True) is RETRY
    t.begin()
    assert t.responded(200, complete=True) == Respond(NO_FLAGS)


def test_a_4xx_is_never_retried_unless_retriable_4xx_and_409() -> None:
    assert tries(attempts=3).responded(404, complete=True) == Respond(NO_FLAGS)
    assert tries(attempts=3).responded(409, complete=True) == Respond(NO_FLAGS)
    assert tries(attempts=3, retry_on=frozenset({"retriable-4xx"})).responded(
        409, complete=True) is RETRY


def test_a_response_before_the_whole_request_was_sent_is_not_retried() -> None:
    """The body is still coming from the app: the request cannot be sent again whole."""
    assert tries(attempts=3).responded(503, complete=False) == Respond(NO_FLAGS)


def test_post_is_retried_only_after_a_connect_failure_unless_allowed() -> None:
    t = tries("POST", attempts=2)
    assert t.responded(503, complete=True) == Respond(NO_FLAGS)
    assert t.failed(RESET, UPSTREAM_RESET) == Answer(503, CONNECT_FAILURE_BODY, UPSTREAM_RESET)
    assert tries("POST", attempts=2).failed(REFUSED, CONNECT_FAILURE) is RETRY
    assert tries("POST", attempts=2, retry_non_idempotent=True).responded(
        503, complete=True) is RETRY


def test_retry_on_selects_the_failures_retried() -> None:
    gateway = frozenset({"gateway-error"})
    assert tries(attempts=1, retry_on=gateway).failed(RESET, UPSTREAM_RESET) == Answer(
        503, CONNECT_FAILURE_BODY, UPSTREAM_RESET)  # a reset is not a gateway error
    assert tries(attempts=1, retry_on=gateway).failed(REFUSED, CONNECT_FAILURE) is RETRY
    assert tries(attempts=1, retry_on=gateway).responded(500, complete=True) == Respond(NO_FLAGS)
    assert tries(attempts=1, retry_on=gateway).responded(504, complete=True) is RETRY


def test_connect_failures_run_out_with_urx_and_503() -> None:
    t = tries(attempts=1)
    assert t.failed(REFUSED, CONNECT_FAILURE) is RETRY
    t.begin()
    assert t.failed(REFUSED, CONNECT_FAILURE) == Answer(503, CONNECT_FAILURE_BODY,
                                                        RETRIES_EXHAUSTED)


def test_per_try_timeouts_retry_then_answer_504_ut_or_urx() -> None:
    t = tries(attempts=1, per_try_timeout_s=0.5)
    assert t.per_try_timeout_s == 0.5
    assert t.per_try_expired() is RETRY
    t.begin()
    assert t.per_try_expired() == Answer(504, TIMEOUT_BODY, RETRIES_EXHAUSTED)
    assert tries(per_try_timeout_s=0.5).per_try_expired() == Answer(504, TIMEOUT_BODY,
                                                                     UPSTREAM_TIMEOUT)


@pytest.mark.parametrize("value", [None, 0.0])
def test_no_per_try_timeout(value: float | None) -> None:
    assert tries(per_try_timeout_s=value).per_try_timeout_s is None


def test_the_deadline_answers_504_whatever_the_tries_left() -> None:
    t = tries(attempts=5)
    assert t.deadline_passed() == Answer(504, TIMEOUT_BODY, UPSTREAM_TIMEOUT)


def test_once_the_app_is_being_answered_nothing_is_tried_again_and_timeouts_are_over() -> None:
    t = tries(attempts=5, per_try_timeout_s=1.0)
    t.answering = True
    assert not t.retryable()
    assert t.per_try_expired() is None
    assert t.deadline_passed() is None
    assert t.failed(RESET, UPSTREAM_RESET) == Answer(503, CONNECT_FAILURE_BODY, UPSTREAM_RESET)
    assert t.reconnect(got_bytes=False, reused=True) is False


def test_a_body_sent_and_not_kept_ends_the_retries() -> None:
    t = tries(attempts=5)
    t.body_lost()
    assert t.responded(503, complete=True) == Respond(NO_FLAGS)
    assert t.failed(REFUSED, CONNECT_FAILURE) == Answer(503, CONNECT_FAILURE_BODY,
                                                        CONNECT_FAILURE)


def test_a_stale_pooled_connection_is_replaced_once_per_try_for_idempotent_requests() -> None:
    t = tries()  # no retries at all: the replacement is not a retry
    assert t.reconnect(got_bytes=False, reused=True) is True
    assert t.reconnect(got_bytes=False, reused=True) is False  # once per try
    t.begin()
    assert t.reconnect(got_bytes=False, reused=True) is True  # a new try, a new chance
    assert tries().reconnect(got_bytes=True, reused=True) is False  # it answered something
    assert tries().reconnect(got_bytes=False, reused=False) is False  # a fresh one failed
    assert tries("POST").reconnect(got_bytes=False, reused=True) is False  # maybe acted on
    assert t.attempt == 2
