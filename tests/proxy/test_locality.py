"""Endpoints on other hosts: the table keeps them apart, the router prefers local ones and
reaches remote ones at their gateway with the SNI and identity the snapshot gives."""

from __future__ import annotations

import random
from typing import Any

import pytest

from composemesh.model.routing import HttpRoute, OutlierPolicy, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import SnapshotError
from composemesh.model.wire import to_builtins
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.router import Router
from composemesh.proxy.selection import Endpoint, EndpointPicker, pick_endpoint
from composemesh.proxy.stats import PeerLabels
from composemesh.proxy.table import build_table
from composemesh.proxy.upstream import upstream_key

from .snapshots import settings_of

PEER_B = "spiffe://cluster.local/ns/b/sa/reviews"


def reviews(v1: int = 1, v2: int = 0) -> ServiceRouting:
    destinations = [WeightedSubset("v1", v1)] + ([WeightedSubset("v2", v2)] if v2 else [])
    return ServiceRouting(service="reviews", routes=(
        HttpRoute(name="default", matches=(), destinations=tuple(destinations)),),
        outlier=OutlierPolicy(consecutive_errors=1, base_ejection_s=30.0,
                              max_ejection_percent=100))


def settings(**extra: Any) -> dict[str, Any]:
    return {
        "trust_domain": "cluster.local",
        "services": {
            "reviews": [
                {"node": "a-reviews-netns-1", "version": "v1", "address": "10.0.0.5"},
                {"node": "b-reviews-1@192.0.2.20", "version": "v1", "address": "192.0.2.20",
                 "port": 15443, "locality": "remote", "peer": PEER_B,
                 "sni": "v1_.reviews.b.svc.cluster.local"},
            ],
            "payments": [
                {"node": "b-payments-1@192.0.2.20", "version": "v1", "address": "192.0.2.20",
                 "port": 15443, "locality": "remote",
                 "peer": "spiffe://cluster.local/ns/b/sa/payments",
                 "sni": "v1_.payments.b.svc.cluster.local"},
            ],
            "legacy": [
                {"node": "legacy-vm", "version": "v1", "address": "192.0.2.77", "port": 5432,
                 "locality": "remote", "plaintext": True},
            ],
        },
        "routing": {"reviews": to_builtins(reviews())},
        "dns": {"payments": "240.241.0.9", "legacy": "240.241.0.10"},
        **extra,
    }


def router() -> Router:
    tls = MeshTls()
    tls.name("cluster.local", "a", federated=True)
    return Router(build_table(settings_of(settings()), project="a"),
                  PeerLabels(workload="web", namespace="a", app="web"), tls=tls,
                  rng=random.Random(1))


def test_remote_endpoints_are_not_routed_by_their_gateway_address_vips_are() -> None:
    table = build_table(settings_of(settings()), project="a")
    assert table.service_at("10.0.0.5") == "reviews"
    assert table.service_at("192.0.2.20") is None  # the gateway's address is not the service
    assert table.service_at("240.241.0.9") == "payments"
    assert table.dns == {"payments": "240.241.0.9", "legacy": "240.241.0.10"}
    assert table.remote == {"reviews", "payments", "legacy"}
    dumped = table.to_json()["payments"]["endpoints"][0]
    assert dumped["locality"] == "remote" and dumped["port"] == 15443


def test_a_vip_taken_by_a_local_endpoint_is_refused_naming_the_field() -> None:
    with pytest.raises(SnapshotError, match=r"\$\.settings\.dns\.payments: 10\.0\.0\.5"):
        build_table(settings_of(settings(dns={"payments": "10.0.0.5"})), project="a")


def test_a_port_out_of_range_is_refused() -> None:
    bad = settings()
    bad["services"]["legacy"][0]["port"] = 70000
    with pytest.raises(SnapshotError, match="port"):
        build_table(settings_of(bad), project="a")


def test_local_ones_first_then_the_remote_ones_and_a_retry_fails_over() -> None:
    here = Endpoint("l", "v1", "10.0.0.5")
    there = Endpoint("r", "v1", "192.0.2.20", port=15443, remote=True)
    both = (here, there)
    picker = EndpointPicker("round_robin")
    assert {pick_endpoint(picker, both, both, local=(here,)) for _ in range(6)} == {here}
    assert pick_endpoint(picker, both, both, (here,), local=(here,)) == there  # the retry
    assert pick_endpoint(picker, both, [there], local=(here,)) == there  # here ejected
    assert pick_endpoint(picker, (there,), (there,), local=()) == there  # none local
    assert pick_endpoint(picker, both, both, both, local=(here,)) == here  # all tried: local
    table = build_table(settings_of(settings()), project="a")
    reviews = table.endpoints[("reviews", "v1")]
    assert table.local_of(reviews) == reviews[:1]
    assert table.local_of(table.endpoints[("payments", "v1")]) == ()
    assert table.local_of((here,)) is None  # not a tuple of the table


def test_tcp_goes_to_the_local_endpoint_while_it_is_available() -> None:
    r = router()
    for _ in range(20):
        to = r.tcp_destination("reviews", 9080, "10.0.0.5")
        assert to is not None and (to.host, to.port, to.sni) == ("10.0.0.5", 9080, None)
        assert to.peer == "spiffe://cluster.local/ns/a/sa/reviews"


def test_the_local_endpoint_ejected_fails_over_to_the_remote_one_and_back() -> None:
    r = router()
    state = r.services["reviews"]
    local = r.table.endpoints[("reviews", "v1")][0]
    state.outlier.record(local, ok=False)  # one error ejects it (consecutive_errors=1)
    assert state.outlier.is_ejected(local)
    to = r.tcp_destination("reviews", 9080, "10.0.0.5")
    assert to is not None
    assert (to.host, to.port) == ("192.0.2.20", 15443)
    assert to.sni == "outbound_.9080_.v1_.reviews.b.svc.cluster.local"
    assert to.peer == PEER_B  # B's instance proves B's identity, end to end
    assert to.labels.destination.namespace == "b"
    state.outlier.retain(())  # its ejection forgotten (as when the endpoint comes back)
    back = r.tcp_destination("reviews", 9080, "10.0.0.5")
    assert back is not None and back.host == "10.0.0.5"


def test_a_service_only_elsewhere_is_reached_through_its_gateway() -> None:
    to = router().tcp_destination("payments", 8080, "240.241.0.9")
    assert to is not None and (to.host, to.port) == ("192.0.2.20", 15443)
    assert to.sni == "outbound_.8080_.v1_.payments.b.svc.cluster.local"


def test_an_instance_outside_the_mesh_is_plain_tcp_to_its_own_address_and_port() -> None:
    to = router().tcp_destination("legacy", 5432, "240.241.0.10")
    assert to is not None and (to.host, to.port, to.peer, to.sni) == (
        "192.0.2.77", 5432, None, None)


def test_the_pool_keys_remote_endpoints_by_gateway_and_sni() -> None:
    local = Endpoint("l", "v1", "10.0.0.5")
    remote = Endpoint("r", "v1", "192.0.2.20", port=15443, remote=True,
                      sni="v1_.reviews.b.svc.cluster.local")
    plain = Endpoint("p", "v1", "192.0.2.77", port=5432, remote=True, plaintext=True)
    assert upstream_key(local, 9080) == ("10.0.0.5", 9080)
    assert upstream_key(remote, 9080) == (
        "192.0.2.20", 15443, "outbound_.9080_.v1_.reviews.b.svc.cluster.local")
    assert upstream_key(remote, 9090) != upstream_key(remote, 9080)
    assert upstream_key(plain, 80) == ("192.0.2.77", 5432)


def test_callers_of_other_projects_are_let_in_only_when_federated() -> None:
    tls = MeshTls()
    tls.name("cluster.local", "b")
    assert tls.source_service("spiffe://cluster.local/ns/a/sa/web") is None
    assert tls.source_service("spiffe://cluster.local/ns/b/sa/web") == "web"
    tls.name("cluster.local", "b", federated=True)
    assert tls.source_service("spiffe://cluster.local/ns/a/sa/web") == "a/web"
    assert tls.source_service("spiffe://other.example/ns/a/sa/web") is None
