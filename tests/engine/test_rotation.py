"""The CLI's decisions in a live root rotation (``engine.rotation``): the steps left from the
pilot's phase, the old and new roots, whether the proxies caught up with a step. Pure."""

from __future__ import annotations

from typing import Any

from composemesh.engine.rotation import rotation_plan, rotation_progress, rotation_roots


def test_the_plan_goes_on_from_the_phase_the_pilot_is_in() -> None:
    assert rotation_plan("steady") == [("begin", True), ("switch", True), ("finish", True)]
    assert rotation_plan("trusting") == [
        ("begin", False), ("switch", True), ("finish", True)]
    assert rotation_plan("switched") == [("switch", False), ("finish", True)]


def test_old_and_new_roots_from_the_ca_info() -> None:
    trusted = [{"fingerprint": "SHA256:old"}, {"fingerprint": "SHA256:new"}]
    assert rotation_roots({"fingerprint": "SHA256:old", "rotation_phase": "steady",
                               "trusted": trusted[:1]}) == ("SHA256:old", None)
    assert rotation_roots({"fingerprint": "SHA256:old", "rotation_phase": "trusting",
                               "trusted": trusted}) == ("SHA256:old", "SHA256:new")
    assert rotation_roots({"fingerprint": "SHA256:new", "rotation_phase": "switched",
                               "trusted": trusted}) == ("SHA256:old", "SHA256:new")


def row(node: str, in_sync: bool = True, issuer: str | None = "SHA256:new",
        running: bool = True, healthy: bool = True) -> dict[str, Any]:
    return {"node": node, "in_sync": in_sync, "cert_issuer_fingerprint": issuer,
            "running": running, "proxy_healthy": healthy}


def test_begin_and_finish_wait_for_every_ack_of_the_published_generation() -> None:
    status: dict[str, Any] = {"generation": 7, "proxies": [row("a"), row("b", in_sync=False),
                                           row("gone", in_sync=False, running=False,
                                               healthy=False)]}
    assert rotation_progress(status, "begin", "SHA256:new", 7) == (
        False, "begin: 1/2 proxies ACKed the bundle with both roots", ["b"])
    status["proxies"][1]["in_sync"] = True
    assert rotation_progress(status, "finish", "SHA256:new", 7) == (
        True, "finish: 2/2 proxies ACKed the bundle without the old root", [])
    # an ACK of what the pilot rendered before the step was published does not count
    assert rotation_progress(status, "begin", "SHA256:new", 8)[0:3:2] == (False, ["a", "b"])
    assert rotation_progress({"generation": 1, "proxies": []}, "begin", "x", 1)[0]


def test_switch_waits_for_every_certificate_of_the_new_root_too() -> None:
    status: dict[str, Any] = {"generation": 3, "proxies": [row("a"), row("b", issuer="SHA256:old"),
                                           row("c", issuer=None, running=False)]}
    done, line, lagging = rotation_progress(status, "switch", "SHA256:new", 3)
    assert (done, lagging) == (False, ["b", "c"])
    assert line == ("switch: 3/3 proxies ACKed the new signing root, "
                    "1/3 hold a certificate of the new root")
    for p in status["proxies"]:
        p["cert_issuer_fingerprint"] = "SHA256:new"
    assert rotation_progress(status, "switch", "SHA256:new", 3)[0]
