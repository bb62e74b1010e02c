"""Where a retry is decided: the tries of one HTTP request, as a pure state object.

The HTTP exchange (``proxy.http.Exchange``) does the I/O: it picks endpoints, connects,
writes, arms the timers. Every time a try ends (a connect failure, a reset, a per-try
timeout, a response head, the route's deadline) it tells its ``Tries``, which answers what
to do next: try again (``RETRY``), answer the app with a status of our own (an ``Answer``),
or pass the response on (``Respond``, with the flags it is counted with). ``Tries`` reads no
clock, opens no socket and sleeps never, so every sequence of events is tested as plain
calls (tests/proxy/test_retries.py).

The rules are Envoy's router filter's, as Istio configures it: ``retry_on`` conditions, a
request that is not idempotent retried only where nothing was sent, ``URX`` when retries
ran out on a failure they would have retried, 504 ``UT`` at a timeout, and one more
connection (same try) when a pooled connection turns out to have been closed by the
upstream before anything was read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from composemesh.model.routing import IDEMPOTENT_METHODS, RetryPolicy
from composemesh.proxy.stats import NO_FLAGS, RETRIES_EXHAUSTED, UPSTREAM_TIMEOUT

TIMEOUT_BODY = b"upstream request timeout"
CONNECT_FAILURE_BODY = b"upstream connect error or disconnect/reset before headers"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one try ended: a response's status, or the error that stopped it."""

    status: int | None = None  # HTTP status when a response came
    error: str | None = None  # "connect-failure" | "reset" | "timeout"


# The retry_on conditions each kind of failure meets, as Envoy reads them: 5xx includes
# every failure to get an answer; gateway-error includes connect failures and per-try
# timeouts (a 504 in effect) but not a reset.
_ERROR_CONDITIONS: dict[str, frozenset[str]] = {
    "connect-failure": frozenset({"connect-failure", "5xx", "gateway-error"}),
    "reset": frozenset({"reset", "5xx"}),
    "timeout": frozenset({"5xx", "gateway-error"}),
}
_STATUS_5XX = frozenset({"5xx"})
_STATUS_GATEWAY = frozenset({"5xx", "gateway-error"})
_STATUS_409 = frozenset({"retriable-4xx"})
_NONE: frozenset[str] = frozenset()


def _conditions(outcome: Outcome) -> frozenset[str]:
    if outcome.error is not None:
        return _ERROR_CONDITIONS.get(outcome.error, _NONE)
    status = outcome.status
    if status is None:
        return _NONE
    if status in (502, 503, 504):
        return _STATUS_GATEWAY
    if 500 <= status <= 599:
        return _STATUS_5XX
    if status == 409:
        return _STATUS_409
    return _NONE


def should_retry(policy: RetryPolicy, method: str, attempt: int, outcome: Outcome) -> bool:
    """Whether to try again after ``attempt`` tries (1 after the first) ended in ``outcome``.

    A retry needs an attempt left and a condition of ``retry_on`` met. A request that is not
    idempotent (POST, PATCH, ...) is retried only after a connect failure, where nothing was
    sent, unless ``retry_non_idempotent``.
    """
    if attempt > policy.attempts:
        return False
    if policy.retry_on.isdisjoint(_conditions(outcome)):
        return False
    return (
        outcome.error == "connect-failure"
        or policy.retry_non_idempotent
        or method in IDEMPOTENT_METHODS
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the app ourselves: ``status`` with ``body``, counted with ``flags``."""

    status: int
    body: bytes
    flags: str


@dataclass(frozen=True, slots=True)
class Respond:
    """Pass the upstream's response on, counted with ``flags``."""

    flags: str


class _Retry:
    __slots__ = ()

    def __repr__(self) -> str:
        return "RETRY"


RETRY: Final = _Retry()  # start the next try
RESPOND: Final = Respond(NO_FLAGS)
_RESPOND_EXHAUSTED: Final = Respond(RETRIES_EXHAUSTED)
_DEADLINE: Final = Answer(504, TIMEOUT_BODY, UPSTREAM_TIMEOUT)

Next = _Retry | Answer


class Tries:
    """The tries of one request under its route's retry policy.

    The exchange calls ``begin`` as each try starts, says when the request can no longer be
    sent again (``body_lost``: a body too large to keep went out) and when the app has
    begun to receive an answer (``answering``); for the rest it asks.
    """

    __slots__ = ("policy", "method", "attempt", "lost", "answering", "reconnected")

    def __init__(self, policy: RetryPolicy, method: str) -> None:
        self.policy = policy
        self.method = method
        self.attempt = 0  # tries begun so far
        self.lost = False  # part of the body went upstream and was not kept
        self.answering = False  # the app has (part of) an answer: nothing can be tried again
        self.reconnected = False  # this try replaced a stale pooled connection already

    @property
    def per_try_timeout_s(self) -> float | None:
        """The timeout of each try, or None for none."""
        t = self.policy.per_try_timeout_s
        return t if t is not None and t > 0 else None

    def begin(self) -> None:
        self.attempt += 1
        self.reconnected = False

    def body_lost(self) -> None:
        self.lost = True

    def retryable(self) -> bool:
        """Whether another try could still be made, whatever the policy says."""
        return not self.lost and not self.answering

    def _retries(self, outcome: Outcome) -> bool:
        return self.retryable() and should_retry(self.policy, self.method, self.attempt, outcome)

    def _exhausted(self, outcome: Outcome) -> bool:
        """Whether retries were made and ran out on a failure the policy retries."""
        return self.attempt > 1 and should_retry(self.policy, self.method, 0, outcome)

    def failed(self, outcome: Outcome, flags: str) -> Next:
        """The try ended without a response (``outcome.error``), counted with ``flags`` if it
        is the last: the next try, or the answer the app gets (504 after a timeout, else
        503; ``URX`` if retries ran out)."""
        if self._retries(outcome):
            return RETRY
        if self._exhausted(outcome):
            flags = RETRIES_EXHAUSTED
        if outcome.error == "timeout":
            return Answer(504, TIMEOUT_BODY, flags)
        return Answer(503, CONNECT_FAILURE_BODY, flags)

    def responded(self, status: int, complete: bool) -> _Retry | Respond:
        """A final response head came (``status`` >= 200); ``complete``: the whole request
        has been sent (only then can it be sent again). The next try, or pass it on."""
        outcome = Outcome(status=status)
        if complete and self._retries(outcome):
            return RETRY
        if status >= 500 and self._exhausted(outcome):
            return _RESPOND_EXHAUSTED
        return RESPOND

    def per_try_expired(self) -> Next | None:
        """The per-try timeout passed: the next try, the answer, or None if the app is
        being answered already (the timeout no longer applies)."""
        if self.answering:
            return None
        return self.failed(Outcome(error="timeout"), UPSTREAM_TIMEOUT)

    def deadline_passed(self) -> Answer | None:
        """The route's timeout passed: 504, or None if the app is being answered already."""
        return None if self.answering else _DEADLINE

    def reconnect(self, got_bytes: bool, reused: bool) -> bool:
        """The connection of this try closed before a response: whether to send the request
        once more on a new connection as the same try. Only for a pooled connection that
        gave nothing back (the upstream had closed it while idle), once per try, and only
        for a request that is idempotent (a POST may have been acted on)."""
        if (got_bytes or not reused or self.reconnected or not self.retryable()
                or self.method not in IDEMPOTENT_METHODS):
            return False
        self.reconnected = True
        return True
