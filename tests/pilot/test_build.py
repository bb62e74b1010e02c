"""The pilot's pure state builder: label splits, route overrides, last good routing kept."""

from composemesh.model.mesh import Workload
from composemesh.model.settings import parse_settings
from composemesh.pilot.build import build_state, default_split, service_versions


def w(node, service, version, weight=None):
    return Workload(
        node=node,
        project="p",
        compose_service=node,
        service=service,
        version=version,
        addresses=("10.0.0.1",),
        running=True,
        weight=weight,
    )


WORKLOADS = (w("r1", "reviews", "v1", 80), w("r2", "reviews", "v2", 20), w("ra", "ratings", "v1"))


def test_versions_and_label_weights():
    assert service_versions(WORKLOADS) == {"reviews": {"v1": 80, "v2": 20}, "ratings": {"v1": None}}


def test_label_split_is_the_default_route():
    state = build_state("p", WORKLOADS, parse_settings(None), {})
    assert default_split(state.routing["reviews"]) == {"v1": 80, "v2": 20}
    assert default_split(state.routing["ratings"]) == {"v1": 100}
    assert state.errors == ()


def test_override_replaces_the_default_split_only():
    settings = parse_settings(
        {
            "routes": {
                "reviews": {
                    "http": [
                        {
                            "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                            "route": {"v2": 100},
                        },
                        {"route": {"v1": 80, "v2": 20}},
                    ]
                }
            }
        }
    )
    state = build_state("p", WORKLOADS, settings, {"reviews": {"v1": 0, "v2": 100}})
    routes = state.routing["reviews"].routes
    assert default_split(state.routing["reviews"]) == {"v1": 0, "v2": 100}
    assert [(d.version, d.weight) for d in routes[0].destinations] == [("v2", 100)]


def test_a_routing_that_no_longer_builds_keeps_the_last_good_one():
    good = build_state("p", WORKLOADS, parse_settings(None), {"reviews": {"v1": 50, "v2": 50}})
    only_v1 = (w("r1", "reviews", "v1", 80), w("ra", "ratings", "v1"))
    later = build_state(
        "p", only_v1, parse_settings(None), {"reviews": {"v1": 50, "v2": 50}}, previous=good
    )
    assert later.routing["reviews"] == good.routing["reviews"]
    assert len(later.errors) == 1 and "reviews" in later.errors[0] and "v2" in later.errors[0]
    assert default_split(later.routing["ratings"]) == {"v1": 100}


POLICIES = {
    "reviews": [
        {"name": "from-productpage", "from": ["productpage"], "to": [{"methods": ["GET"]}]}
    ],
    "ratings": [{"action": "DENY", "from": ["reviews"]}],
}


def test_policies_are_parsed_once_per_state_even_for_services_not_running_yet():
    state = build_state("p", WORKLOADS, parse_settings({"policies": POLICIES}), {})
    assert state.errors == ()
    assert [p.name for p in state.policies["reviews"]] == ["from-productpage"]
    assert state.policies["reviews"][0].sources == frozenset({"productpage"})  # not running
    assert state.policies["ratings"][0].action == "DENY"
    assert build_state("p", WORKLOADS, parse_settings(None), {}).policies == {}


def test_policies_that_do_not_parse_keep_the_last_good_ones():
    good = build_state("p", WORKLOADS, parse_settings({"policies": POLICIES}), {})
    bad = {"reviews": [{"action": "MAYBE"}]}
    state = build_state("p", WORKLOADS, parse_settings({"policies": bad}), {}, good)
    assert state.policies == good.policies
    assert state.errors == (
        "policies: x-composemesh.policies.reviews[0].action: 'MAYBE' is not one of ALLOW, DENY",
    )
    assert state.routing == good.routing  # the routing is built all the same
    first = build_state("p", WORKLOADS, parse_settings({"policies": bad}), {})
    assert first.policies == {} and len(first.errors) == 1
