"""The classification of compose services, directly: one case per ServiceKind, and the
services it leaves out (the injector's own)."""

from __future__ import annotations

from typing import Any

import pytest

from composemesh.inject.classify import Classification, ServiceKind, classify, mesh_labels
from composemesh.model import wellknown as wk


def classified(services: dict[str, Any]) -> dict[str, Classification]:
    return classify(services, mesh_labels(services, None))


def netns_of(app: str) -> dict[str, Any]:
    """An injected holder of ``app``, as the injector labels it."""
    return {"image": "mesh", "labels": {wk.LABEL_ROLE: wk.ROLE_NETNS, wk.LABEL_OF: app}}


def test_a_plain_service_owns_its_namespace() -> None:
    assert classified({"web": {"image": "nginx"}})["web"] == Classification(ServiceKind.OWNER)


@pytest.mark.parametrize("mode", ["bridge", "default"])
def test_a_network_mode_of_its_own_still_owns(mode: str) -> None:
    out = classified({"web": {"image": "nginx", "network_mode": mode}})
    assert out["web"].kind is ServiceKind.OWNER


def test_an_app_in_its_own_holder_was_meshed_before() -> None:
    holder = wk.netns_service("web")
    services = {
        "web": {"image": "nginx", "network_mode": f"service:{holder}"},
        holder: netns_of("web"),
    }
    out = classified(services)
    assert out["web"] == Classification(ServiceKind.MESHED, holder=holder, owner="web")
    assert holder not in out  # the injector's own: regenerated, not classified


def test_a_service_in_a_meshed_namespace_joins_it() -> None:
    services = {
        "web": {"image": "nginx"},
        "sidecar": {"image": "busybox", "network_mode": "service:web"},
    }
    out = classified(services)
    assert out["web"].kind is ServiceKind.OWNER
    joiner = out["sidecar"]
    assert joiner.kind is ServiceKind.JOINER
    assert (joiner.holder, joiner.owner) == (wk.netns_service("web"), "web")
    assert joiner.note and "'web'" in joiner.note


def test_a_joiner_of_a_joiner_shares_the_first_namespace() -> None:
    services = {
        "c": {"image": "busybox", "network_mode": "service:b"},
        "b": {"image": "busybox", "network_mode": "service:a"},
        "a": {"image": "nginx"},
    }
    out = classified(services)
    assert out["c"].kind is ServiceKind.JOINER
    assert (out["c"].holder, out["c"].owner) == (wk.netns_service("a"), "a")


@pytest.mark.parametrize("mode", ["host", "none", "container:abc", "service:off"])
def test_a_namespace_no_proxy_can_sit_in_is_left_out(mode: str) -> None:
    services = {
        "web": {"image": "nginx", "network_mode": mode},
        "off": {"image": "nginx", "labels": {wk.LABEL_ENABLE: "false"}},
    }
    left = classified(services)["web"]
    assert left.kind is ServiceKind.LEFT_OUT
    assert left.note and left.note.startswith(f"network_mode {mode}: left out of the mesh")
    assert (left.holder, left.owner) == (None, None)


def test_enable_false_is_disabled() -> None:
    services = {"web": {"image": "nginx", "labels": {wk.LABEL_ENABLE: "false"}}}
    assert classified(services)["web"] == Classification(ServiceKind.DISABLED)


def test_someone_elses_role_is_foreign() -> None:
    services = {"tool": {"image": "x", "labels": {wk.LABEL_ROLE: "something-else"}}}
    assert classified(services)["tool"] == Classification(ServiceKind.FOREIGN)


@pytest.mark.parametrize("role", [wk.ROLE_NETNS, wk.ROLE_PROXY, wk.ROLE_PILOT])
def test_the_injectors_own_services_are_not_classified(role: str) -> None:
    assert classified({"x": {"image": "mesh", "labels": {wk.LABEL_ROLE: role}}}) == {}

