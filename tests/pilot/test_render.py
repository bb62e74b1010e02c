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
    assert snap.settings.mtls_mode == "STRICT"
    services = snap.settings.services
    assert [e.version for e in services["reviews"]] == ["v1", "v2"]
    assert services["ratings"][0].addresses == ("10.0.0.3",)


def test_per_service_mtls_override():
    assert render_snapshot(STATE, STATE.workloads[2]).settings.mtls_mode == "PERMISSIVE"


def test_same_view_same_version_and_change_makes_new_version():
    first = render_snapshot(STATE, STATE.workloads[0])
    again = render_snapshot(replace(STATE), STATE.workloads[0])
    assert first.version == again.version
    stopped = replace(
        STATE, workloads=(*STATE.workloads[:2], replace(STATE.workloads[2], running=False))
    )
    changed = render_snapshot(stopped, stopped.workloads[0])
    assert changed.version != first.version
    assert "ratings" not in changed.settings.services


def test_snapshots_of_different_proxies_differ():
    assert (
        render_snapshot(STATE, STATE.workloads[0]).version
        != render_snapshot(STATE, STATE.workloads[1]).version
    )


def test_inbound_enforcement_settings():
    """What a destination proxy enforces: its own service's policies, published ports, its
    networks, and which root signs now."""
    from composemesh.model.mesh import NetworkAttachment
    from composemesh.model.policy import Operation, Policy
    from composemesh.model.snapshot import SCHEMA, decode_snapshot, encode_snapshot
    from composemesh.pilot.build import build_state

    settings = parse_settings({
        "policies": {
            "reviews": [{"name": "pp", "from": ["productpage"], "to": [{"paths": ["/api/*"]}]}],
            "productpage": [{"from": ["*"]}],
        },
    })
    reviews = replace(
        STATE.workloads[0],
        published_ports=(443, 9080),
        attachments=(NetworkAttachment("p_back", "10.0.0.1", "10.0.0.0/24", "10.0.0.254"),),
    )
    state = build_state("p", (reviews, *STATE.workloads[1:]), settings, {})
    snap = render_snapshot(state, reviews, "PEM", "SHA256:ab:cd")
    assert snap.schema == SCHEMA == 1
    assert snap.settings.policies == {
        "reviews": (Policy("pp", sources=frozenset({"productpage"}),
                           operations=(Operation(paths=("/api/*",)),)),),
    }
    assert snap.settings.published_ports == (443, 9080)
    assert snap.settings.networks == (
        NetworkAttachment("p_back", "10.0.0.1", "10.0.0.0/24", "10.0.0.254"),)
    assert snap.settings.signing_root == "SHA256:ab:cd"
    assert snap.settings.mtls_mode == "STRICT"
    assert decode_snapshot(encode_snapshot(snap)) == snap  # plain JSON on the wire

    ratings = render_snapshot(state, state.workloads[2])  # no policy of its own: none
    assert ratings.settings.policies == {}
    assert ratings.settings.published_ports == () and ratings.settings.networks == ()
    assert ratings.settings.signing_root == ""

    # versioned by content: the same view is the same version, each input a new one
    assert render_snapshot(replace(state), reviews, "PEM", "SHA256:ab:cd").version == snap.version
    others = [
        render_snapshot(state, reviews, "PEM", "SHA256:ef"),
        render_snapshot(state, replace(reviews, published_ports=(9080,)), "PEM", "SHA256:ab:cd"),
        render_snapshot(replace(state, policies={}), reviews, "PEM", "SHA256:ab:cd"),
        render_snapshot(state, replace(reviews, attachments=()), "PEM", "SHA256:ab:cd"),
    ]
    assert len({snap.version, *(o.version for o in others)}) == 5
