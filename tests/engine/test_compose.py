"""``engine.compose``: the pure parts (published ports of a meshed model, the container a
failure names, the services to build), and where the host reaches each published port (the
engine's answers stood in for by tests/engine/fake_engine.py)."""

from __future__ import annotations

from typing import Any

from composemesh.engine import compose
from composemesh.engine.compose import PublishedPort, published_ports, published_target
from composemesh.model import wellknown as wk
from tests.engine.fake_engine import Engine


def test_the_container_port_of_a_published_entry() -> None:
    assert published_target("8080:9080") == 9080
    assert published_target("127.0.0.1:8080:9080/tcp") == 9080
    assert published_target("9080") is None  # exposed to the network, not the host
    assert published_target("8000-8001:9000-9001") is None  # a range: not one address
    assert published_target({"target": 9080, "published": "8080"}) == 9080
    assert published_target({"target": 9080}) is None


def model() -> dict[str, Any]:
    return {"services": {
        "web-netns": {"labels": {wk.LABEL_ROLE: "netns", wk.LABEL_OF: "web"},
                      "ports": ["8080:9080", {"target": 9443, "published": "8443"}, "9999"]},
        "pilot": {"labels": {wk.LABEL_ROLE: wk.ROLE_PILOT}, "ports": ["7000:7000"]},
        "db": {"labels": ["a=b"], "ports": ["5432:5432"], "build": {"context": "."}},
        "cache": {"image": "redis", "build": None},
    }}


def test_published_ports_of_the_meshed_model_say_the_apps_name() -> None:
    assert published_ports(model()) == [
        PublishedPort("web-netns", "web", 9080), PublishedPort("web-netns", "web", 9443),
        PublishedPort("db", "db", 5432)]
    assert published_ports({}) == []


def test_the_failed_container_and_the_services_to_build() -> None:
    assert compose.failed_container("container shop-web-1 is unhealthy") == "shop-web-1"
    assert compose.failed_container("pull access denied for x") is None
    assert compose.services_to_build(model()) == ["db"]


def test_where_the_host_reaches_each_published_port(engine: Engine) -> None:
    labels = {"com.docker.compose.project": "shop", "com.docker.compose.service": "web-netns"}
    engine.add("1" * 64, "shop-web-netns-1", labels, NetworkSettings={"Ports": {
        "9080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"},
                     {"HostIp": "::", "HostPort": "8080"}]}})
    engine.add("2" * 64, "shop-db-1", {"com.docker.compose.project": "shop",
                                       "com.docker.compose.service": "db"}, running=False)
    assert compose.published_port("shop", "web-netns", 9080) == "0.0.0.0:8080"
    assert compose.published_port("shop", "db", 5432) is None  # not running
    assert compose.published_addresses("shop", model()) == [
        (PublishedPort("web-netns", "web", 9080), "0.0.0.0:8080")]
    assert compose.running_containers("shop") == ["shop-db-1", "shop-web-netns-1"]
    assert compose.running_containers("other") == []
