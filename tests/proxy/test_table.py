"""The routing table decoded from a snapshot: lookups, defaults, one clear error per bad field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from composemesh.model.routing import (
    HttpRoute,
    RetryPolicy,
    ServiceRouting,
    WeightedSubset,
)
from composemesh.model.snapshot import ProxyIdentity, Snapshot, SnapshotError
from composemesh.model.wire import to_builtins
from composemesh.proxy.selection import Endpoint
from composemesh.proxy.table import EMPTY_TABLE, build_table, table_from_snapshot

from .snapshots import settings_of

REVIEWS = ServiceRouting(
    service="reviews",
    routes=(HttpRoute(name="default", matches=(),
                      destinations=(WeightedSubset("v1", 90), WeightedSubset("v2", 10)),
                      retries=RetryPolicy(attempts=2)),),
)


def settings() -> dict[str, Any]:
    return {
        "services": {
            "reviews": [
                {"node": "shop-reviews-v1-netns-1", "version": "v1", "address": "10.0.0.5",
                 "addresses": ["10.0.0.5", "172.20.0.5"]},
                {"node": "shop-reviews-v1-netns-2", "version": "v1", "address": "10.0.0.6"},
                {"node": "shop-reviews-v2-netns-1", "version": "v2", "address": "10.0.0.7",
                 "compose_service": "reviews-canary"},
            ],
            "ratings": [{"node": "vm-ratings", "version": "v1", "address": "10.0.1.9"}],
        },
        "routing": {"reviews": to_builtins(REVIEWS)},
        "protocols": {"reviews": {"default": "http", "ports": {"9090": "tcp"}},
                      "ratings": {"default": None, "ports": {}}},
    }


def test_lookups_by_address_service_and_version() -> None:
    table = build_table(settings_of(settings()), project="shop")
    assert table.service_at("10.0.0.6") == "reviews"
    assert table.service_at("172.20.0.5") == "reviews"  # dialed on another network
    assert table.service_at("::ffff:10.0.0.6") == "reviews"
    assert table.service_at("10.0.1.9") == "ratings"
    assert table.service_at("93.184.216.34") is None
    assert table.routing["reviews"] == REVIEWS
    assert [ep.node for ep in table.endpoints[("reviews", "v1")]] == [
        "shop-reviews-v1-netns-1", "shop-reviews-v1-netns-2"]
    assert table.endpoints[("reviews", "v2")] == (
        Endpoint("shop-reviews-v2-netns-1", "v2", "10.0.0.7"),)
    assert len(table.service_endpoints["reviews"]) == 3
    assert table.services == ("ratings", "reviews")


def test_protocols_per_port_then_default_then_detect() -> None:
    table = build_table(settings_of(settings()), project="shop")
    assert table.protocol("reviews", 9080) == "http"
    assert table.protocol("reviews", 9090) == "tcp"
    assert table.protocol("ratings", 9080) is None
    assert table.protocol("details", 9080) is None  # not declared at all: detect


def test_workload_labels_come_from_the_node_name_or_the_entry() -> None:
    table = build_table(settings_of(settings()), project="shop")
    v1, _ = table.endpoints[("reviews", "v1")]
    assert table.workload(v1) == "reviews-v1"
    assert table.workload(table.endpoints[("reviews", "v2")][0]) == "reviews-canary"
    assert table.workload(table.endpoints[("ratings", "v1")][0]) == "unknown"


def test_a_service_without_routing_gets_an_even_split_over_its_versions() -> None:
    table = build_table(settings_of(settings()), project="shop")
    (route,) = table.routing["ratings"].routes
    assert route.matches == ()
    assert route.destinations == (WeightedSubset("v1", 1),)


def test_a_snapshot_without_the_keys_gives_the_empty_table() -> None:
    snapshot = Snapshot(version="1", identity=ProxyIdentity("n", "shop", "web", "web", "v1"))
    assert table_from_snapshot(snapshot) == EMPTY_TABLE
    assert EMPTY_TABLE.service_at("10.0.0.5") is None


def test_config_dump_shape() -> None:
    dump = build_table(settings_of(settings()), project="shop").to_json()
    assert dump["reviews"]["protocols"] == {"default": "http", "ports": {"9090": "tcp"}}
    assert dump["reviews"]["endpoints"][0] == {
        "node": "shop-reviews-v1-netns-1", "version": "v1", "address": "10.0.0.5",
        "workload": "reviews-v1"}
    assert dump["reviews"]["routing"] == to_builtins(REVIEWS)


def _broken(change: Any) -> dict[str, Any]:
    s = copy.deepcopy(settings())
    change(s)
    return s


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(services=[]), "$.settings.services: Expected `object`, got `array`"),
    (lambda s: s["services"].update(reviews={}),
     "$.settings.services.reviews: Expected `array`, got `object`"),
    (lambda s: s["services"]["reviews"][1].pop("address"),
     "$.settings.services.reviews[1]: Object missing required field `address`"),
    (lambda s: s["services"]["reviews"][1].update(address="reviews.local"),
     "$.settings.services.reviews[1].address: 'reviews.local' is not an IP address"),
    (lambda s: s["services"]["ratings"][0].update(address="10.0.0.5"),
     # the wire sorts services: ratings is read first, reviews then clashes with it
     "$.settings.services.reviews[0].address: 10.0.0.5 is already an endpoint of 'ratings'"),
    (lambda s: s["services"]["ratings"][0].update(addresses=["10.0.1.9", "172.20.0.5"]),
     "$.settings.services.reviews[0].address: 172.20.0.5 is already an endpoint of 'ratings'"),
    (lambda s: s["services"]["ratings"][0].update(addresses=["x"]),
     "$.settings.services.ratings[0].addresses[0]: 'x' is not an IP address"),
    (lambda s: s["services"]["ratings"][0].update(version=3),
     "$.settings.services.ratings[0].version: Expected `str`, got `int`"),
    (lambda s: s["routing"]["reviews"].update(load_balancer="random"),
     "$.settings.routing.reviews.load_balancer: Invalid enum value 'random'"),
    (lambda s: s["routing"]["reviews"]["routes"][0].pop("destinations"),
     "$.settings.routing.reviews.routes[0]: Object missing required field `destinations`"),
    (lambda s: s["routing"].update(ratings=s["routing"]["reviews"]),
     "$.settings.routing.ratings.service: 'reviews' is not the service it is listed under"),
    (lambda s: s["protocols"]["reviews"].update(default="grpc"),
     "$.settings.protocols.reviews.default: Invalid enum value 'grpc'"),
    (lambda s: s["protocols"]["reviews"]["ports"].update({"http": "http"}),
     "$.settings.protocols.reviews.ports: Expected `str` matching regex"),
    (lambda s: s["protocols"]["reviews"]["ports"].update({"9080": "udp"}),
     "$.settings.protocols.reviews.ports.9080: Invalid enum value 'udp'"),
    (lambda s: s["services"]["ratings"][0].update(version=""),
     "$.settings.services.ratings[0].version: Expected `str` of length >= 1"),
    (lambda s: s["protocols"]["reviews"]["ports"].update({"70000": "http"}),
     "$.settings.protocols.reviews.ports.70000: not a port number"),
])
def test_a_bad_field_is_one_error_naming_it(change: Any, message: str) -> None:
    with pytest.raises(SnapshotError) as caught:
        build_table(settings_of(_broken(change)), project="shop")
    assert str(caught.value).startswith(message), str(caught.value)


def test_compose_service_names_pin_their_own_endpoints_mesh_names_do_not() -> None:
    table = build_table(settings_of(settings()), project="shop")
    assert table.pinned["reviews-canary"] == (Endpoint("shop-reviews-v2-netns-1", "v2",
                                                       "10.0.0.7"),)
    assert [ep.address for ep in table.pinned["reviews-v1"]] == ["10.0.0.5", "10.0.0.6"]
    assert "reviews" not in table.pinned and "ratings" not in table.pinned


def test_every_address_of_a_pinned_instance_names_its_compose_service() -> None:
    """TCP carries no Host: the address dialed names the compose service (any of the
    instance's addresses, on any network, also as an IPv4-mapped IPv6 address)."""
    table = build_table(settings_of(settings()), project="shop")
    v1 = table.pinned["reviews-v1"]
    for address in ("10.0.0.5", "172.20.0.5", "10.0.0.6", "::ffff:10.0.0.6"):
        assert table.pinned_at(address) == v1, address
    assert table.pinned_at("10.0.0.7") == table.pinned["reviews-canary"]
    assert table.pinned_at("10.0.1.9") == ()  # ratings: no name of its own
    assert table.pinned_at("10.9.9.9") == ()


def test_idle_addresses_are_still_routed_as_their_service() -> None:
    data = settings()
    data["idle_addresses"] = {"reviews": ["10.0.0.99"], "gone": ["10.0.9.9"]}
    table = build_table(settings_of(data), project="shop")
    assert table.service_at("10.0.0.99") == "reviews"
    assert table.service_at("10.0.9.9") == "gone"
    assert table.serving_versions("reviews") == frozenset({"v1", "v2"})
    assert table.serving_versions("gone") == frozenset()
