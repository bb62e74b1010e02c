"""Per-proxy snapshot rendering: pure, versioned by content."""

from dataclasses import replace

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import parse_settings
from composemesh.pilot.render import render_snapshot


def workload(node, service, version="v1", addresses=("10.0.0.1",), running=True):
    return Workload(
        node=node,
        project="p",
        compose_service=node,
        service=service,
        version=version,
        addresses=addresses,
        running=running,
    )


STATE = MeshState(
    project="p",
    workloads=(
        workload("a", "reviews"),
        workload("b", "reviews", "v2", ("10.0.0.2",)),
        workload("c", "ratings", addresses=("10.0.0.3",)),
    ),
    settings=parse_settings({"mtls": {"mode": "STRICT", "services": {"ratings": "PERMISSIVE"}}}),
)


def test_identity_and_endpoints():
    snap = render_snapshot(STATE, STATE.workloads[0])
    assert snap.identity.node == "a" and snap.identity.service == "reviews"
    assert snap.settings["mtls_mode"] == "STRICT"
    services = snap.settings["services"]
    assert [e["version"] for e in services["reviews"]] == ["v1", "v2"]
    assert services["ratings"][0]["addresses"] == ["10.0.0.3"]


def test_per_service_mtls_override():
    assert render_snapshot(STATE, STATE.workloads[2]).settings["mtls_mode"] == "PERMISSIVE"


def test_same_view_same_version_and_change_makes_new_version():
    first = render_snapshot(STATE, STATE.workloads[0])
    again = render_snapshot(replace(STATE), STATE.workloads[0])
    assert first.version == again.version
    stopped = replace(
        STATE, workloads=(*STATE.workloads[:2], replace(STATE.workloads[2], running=False))
    )
    changed = render_snapshot(stopped, stopped.workloads[0])
    assert changed.version != first.version
    assert "ratings" not in changed.settings["services"]


def test_snapshots_of_different_proxies_differ():
    assert (
        render_snapshot(STATE, STATE.workloads[0]).version
        != render_snapshot(STATE, STATE.workloads[1]).version
    )
