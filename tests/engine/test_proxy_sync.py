"""What the pilot's status says about the proxies catching up (``engine.proxy_sync``): the
pure counts, and the waits over a scripted series of status answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from composemesh.engine import proxy_sync
from composemesh.engine.proxy_sync import Count, acked, not_in_sync, ready
from composemesh.errors import EngineError, NotReadyError


def proxy(node: str, *, running: bool = True, in_sync: bool = True, healthy: bool = True,
          issuer: str | None = "SHA256:new") -> dict[str, Any]:
    return {"node": node, "running": running, "in_sync": in_sync, "proxy_healthy": healthy,
            "cert_issuer_fingerprint": issuer}


def status(generation: int, *proxies: dict[str, Any]) -> dict[str, Any]:
    return {"generation": generation, "proxies": list(proxies)}


def series(*answers: object) -> Callable[[], dict[str, Any]]:
    """The pilot's status answers in turn (the last one again and again)."""
    left = list(answers)

    def fetch() -> dict[str, Any]:
        value = left.pop(0) if len(left) > 1 else left[0]
        if isinstance(value, Exception):
            raise value
        assert isinstance(value, dict)
        return value

    return fetch


def test_acked_counts_the_running_proxies_of_the_published_generation() -> None:
    s = status(4, proxy("a"), proxy("b", in_sync=False), proxy("gone", running=False,
                                                                in_sync=False))
    assert acked(s, 4) == Count(False, 1, 2)
    s["proxies"][1]["in_sync"] = True
    assert acked(s, 4) == Count(True, 2, 2)
    assert acked(s, 5) == Count(False, 2, 2)  # the pilot has not published it yet
    assert not_in_sync(s) == ["gone"] and not_in_sync(None) == []


def test_ready_needs_some_proxies_each_healthy_and_in_sync() -> None:
    assert ready(status(1)) == Count(False, 0, 0)
    assert ready(status(1, proxy("a"), proxy("b", healthy=False))) == Count(False, 1, 2)
    assert ready(status(1, proxy("a"), proxy("x", running=False, healthy=False))) == Count(
        True, 1, 1)


def test_wait_acked_reports_counts_until_all_acked() -> None:
    seen: list[Count] = []
    last = status(2, proxy("a"), proxy("b"))
    got = proxy_sync.wait_acked(series(status(1, proxy("a"), proxy("b")),
                                       status(2, proxy("a"), proxy("b", in_sync=False)), last),
                                2, 5, seen.append)
    assert got == last
    assert seen == [Count(False, 2, 2), Count(False, 1, 2), Count(True, 2, 2)]


def test_wait_acked_names_who_did_not_ack() -> None:
    behind = status(2, proxy("a"), proxy("b", in_sync=False))
    with pytest.raises(NotReadyError, match=r"^not every proxy ACKed within 0.1s: b$"):
        proxy_sync.wait_acked(series(behind), 2, 0.1, lambda n: None)


def test_wait_ready_asks_again_while_the_pilot_does_not_answer() -> None:
    seen: list[Count] = []
    good = status(1, proxy("a"))
    got = proxy_sync.wait_ready(series(EngineError("no running pilot"), good), 30, seen.append)
    assert got == good and seen == [Count(True, 1, 1)]


def test_wait_rotation_step_reports_lines_and_on_timeout_the_last_and_who() -> None:
    lines: list[str] = []
    late: list[str] = []
    renewed = status(3, proxy("a"), proxy("b"))
    proxy_sync.wait_rotation_step(series(status(3, proxy("a"), proxy("b", issuer="old")),
                                         renewed), "switch", "SHA256:new", 3, 5,
                                  lines.append, late.append)
    assert lines == ["switch: 2/2 proxies ACKed the new signing root, 1/2 hold a certificate "
                     "of the new root",
                     "switch: 2/2 proxies ACKed the new signing root, 2/2 hold a certificate "
                     "of the new root"]
    assert late == []
    with pytest.raises(NotReadyError) as info:
        proxy_sync.wait_rotation_step(series(status(3, proxy("a", in_sync=False))), "begin",
                                      "SHA256:new", 3, 0.1, lines.append, late.append)
    assert late == ["begin: 0/1 proxies ACKed the bundle with both roots"]
    assert str(info.value) == (
        "the root rotation stopped after its begin step: a did not catch up within 0.1s; the "
        "mesh keeps working as it is, and `composemesh certs rotate-root` goes on from there")
