"""What the pilot's ``GET /v1/status`` says about the proxies catching up, and the CLI's
waits for it: after a route change (every running proxy ACKed the new generation), after
`up` (every running proxy ready and in sync), after each step of a root rotation.

The counts are pure; each wait asks ``fetch`` (the pilot's status, e.g.
``PilotClient.status``) through ``poll.poll_until`` and reports to its callback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from composemesh.engine.poll import poll_until
from composemesh.engine.rotation import rotation_progress
from composemesh.errors import EngineError, NotReadyError

Status = dict[str, Any]  # a decoded answer of GET /v1/status


@dataclass(frozen=True)
class Count:
    """How many of the running proxies are there yet (``of`` of ``total``), and whether
    that is all of what is waited for."""

    done: bool
    of: int
    total: int


def acked(status: Status, generation: int) -> Count:
    """Every running proxy ACKed, and the pilot publishes ``generation`` or later."""
    proxies = [p for p in status["proxies"] if p["running"]]
    synced = [p for p in proxies if p["in_sync"]]
    published = status.get("generation", 0) >= generation
    return Count(published and len(synced) == len(proxies), len(synced), len(proxies))


def ready(status: Status) -> Count:
    """Some proxies run and every running one is healthy and ACKed its snapshot."""
    proxies = [p for p in status.get("proxies", []) if p["running"]]
    good = [p for p in proxies if p["in_sync"] and p["proxy_healthy"]]
    return Count(bool(proxies) and len(good) == len(proxies), len(good), len(proxies))


def not_in_sync(status: Status | None) -> list[str]:
    """The nodes of the proxies (running or not) that have not ACKed their snapshot."""
    return [p["node"] for p in (status or {}).get("proxies", []) if not p.get("in_sync")]


def wait_acked(fetch: Callable[[], Status], generation: int, timeout: float,
               on_progress: Callable[[Count], None]) -> Status:
    """The first status in which every running proxy ACKed ``generation``; NotReadyError
    naming the proxies behind after ``timeout`` seconds."""

    def late(last: Status | None) -> NotReadyError:
        lagging = ", ".join(not_in_sync(last))
        return NotReadyError(f"not every proxy ACKed within {timeout}s: {lagging}")

    return poll_until(fetch, lambda s: acked(s, generation).done, timeout,
                      lambda s: on_progress(acked(s, generation)), interval=0.05,
                      on_timeout=late)


def wait_ready(fetch: Callable[[], Status], timeout: float,
               on_progress: Callable[[Count], None]) -> Status:
    """The first status in which every running proxy is ready and in sync; a pilot that
    does not answer yet (EngineError) is asked again. At least 10 s."""

    def late(last: Status | None) -> NotReadyError:
        lagging = ", ".join(not_in_sync(last)) or "pilot never answered"
        return NotReadyError(f"proxies not ready after {timeout:.0f}s: {lagging}")

    return poll_until(fetch, lambda s: ready(s).done, max(timeout, 10),
                      lambda s: on_progress(ready(s)), interval=0.5, on_timeout=late,
                      retry_on=(EngineError,))


def wait_rotation_step(fetch: Callable[[], Status], step: str, new_root: str,
                       generation: int, timeout: float, on_line: Callable[[str], None],
                       on_late: Callable[[str], None]) -> None:
    """Until every proxy has caught up with ``step`` of a root rotation (see
    ``rotation.rotation_progress``; each status's line to ``on_line``); after ``timeout``
    seconds the last line to ``on_late`` and NotReadyError naming who did not."""

    def late(last: Status | None) -> NotReadyError:
        _, line, lagging = rotation_progress(last or {}, step, new_root, generation)
        on_late(line)
        return NotReadyError(
            f"the root rotation stopped after its {step} step: "
            f"{', '.join(lagging)} did not catch up within {timeout:g}s; the mesh keeps "
            f"working as it is, and `composemesh certs rotate-root` goes on from there"
        )

    poll_until(fetch, lambda s: rotation_progress(s, step, new_root, generation)[0], timeout,
               lambda s: on_line(rotation_progress(s, step, new_root, generation)[1]),
               interval=0.2, on_timeout=late)
