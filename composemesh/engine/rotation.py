"""The CLI's decisions in a live root rotation (`composemesh certs rotate-root`): which
steps are left from the phase the pilot is in, which roots are old and new, and whether the
proxies have caught up with a step. Pure: the answers of the pilot's API in, decisions out."""

from __future__ import annotations

from typing import Any

ROTATION_STEPS = ("begin", "switch", "finish")
_TAKEN_BY_PHASE = {"steady": 0, "trusting": 1, "switched": 2}  # steps already taken


def rotation_plan(phase: str) -> list[tuple[str, bool]]:
    """The steps of a root rotation from ``phase`` on, each with whether to take it (False:
    the pilot took it already, only wait for the mesh to catch up with it)."""
    taken = _TAKEN_BY_PHASE.get(phase, 0)
    return [(step, i >= taken) for i, step in enumerate(ROTATION_STEPS) if i >= taken - 1]


def rotation_roots(info: dict[str, Any]) -> tuple[str, str | None]:
    """The old and new root fingerprints from a ``GET /v1/ca`` answer (new: None if steady)."""
    trusted = [str(t.get("fingerprint")) for t in info.get("trusted") or []]
    active = str(info.get("fingerprint", "?"))
    phase = info.get("rotation_phase")
    if phase == "trusting" and len(trusted) == 2:
        return active, trusted[1]
    if phase == "switched" and len(trusted) == 2:
        return trusted[0], active
    return active, None


def rotation_progress(
    status: dict[str, Any], step: str, new_root: str, generation: int = 0
) -> tuple[bool, str, list[str]]:
    """Whether every proxy has caught up with ``step`` of a root rotation, the line that says
    how far they are, and the nodes still behind.

    Every step: the proxy ACKed its current snapshot (begin: the bundle of both roots;
    finish: the new root's alone). ``switch`` also: its certificate was issued by
    ``new_root``. A proxy counts if its app or the proxy itself runs.
    """
    proxies = [p for p in status.get("proxies", []) if p.get("running") or p.get("proxy_healthy")]
    published = int(status.get("generation", 0)) >= generation
    synced = {p["node"] for p in proxies if p.get("in_sync") and published}
    renewed = {p["node"] for p in proxies if p.get("cert_issuer_fingerprint") == new_root}
    done = synced & renewed if step == "switch" else synced
    n = len(proxies)
    what = {"begin": "the bundle with both roots", "switch": "the new signing root",
            "finish": "the bundle without the old root"}.get(step, step)
    line = f"{step}: {len(synced)}/{n} proxies ACKed {what}"
    if step == "switch":
        line += f", {len(renewed)}/{n} hold a certificate of the new root"
    lagging = sorted(p["node"] for p in proxies if p["node"] not in done)
    return not lagging, line, lagging
