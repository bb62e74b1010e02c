"""parse_sni: a round trip of sni/sni_tail, and hostile names refused (None)."""

from __future__ import annotations

import pytest

from composemesh.model.east_west import GatewayTarget, parse_sni, sni, sni_tail


def test_round_trip() -> None:
    name = sni(9080, sni_tail("v1", "reviews", "shop", "cluster.local"))
    assert name == "outbound_.9080_.v1_.reviews.shop.svc.cluster.local"
    assert parse_sni(name) == GatewayTarget(9080, "v1", "reviews", "shop", "cluster.local")
    assert parse_sni(name.upper()) == parse_sni(name)


@pytest.mark.parametrize("name", [
    None, "", "reviews.shop.svc.cluster.local", "outbound_.0_.v1_.reviews.shop.svc.td",
    "outbound_.65536_.v1_.reviews.shop.svc.td", "outbound_.99999_.v1_.r.shop.svc.td",
    "outbound_.80_.v1_.reviews.shop.svc.", "outbound_.80_.v1_.reviews.svc.td",
    "outbound_.80_.v1_.reviews.shop.svc.td\n", "outbound_.80_.v1_.revíews.shop.svc.td",
    "outbound_.80_..reviews.shop.svc.td", "x" * 300, "outbound_.80_.v1_." + "a" * 250 + ".p.svc.td",
])
def test_hostile_names(name: str | None) -> None:
    assert parse_sni(name) is None
