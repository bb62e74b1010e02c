"""Consul's JSON to the mesh's values and back, exactly; malformed entries skipped and said why."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from composemesh.consul import convert
from composemesh.model.consul import CatalogInstance, ConsulSettings, ExportedInstance

RECORDED = Path(__file__).parent / "recorded"
SETTINGS = ConsulSettings(address="http://consul.internal:8500", token="t", datacenter="dc1",
                          host_address="192.0.2.10", east_west_port=15443)
WEB = ExportedInstance(project="shop", compose_service="web-v2", instance=2, service="web",
                       version="v2", spiffe="spiffe://cluster.local/ns/shop/sa/web")


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def test_registration_of_an_instance() -> None:
    assert convert.registration(WEB, SETTINGS) == {
        "ID": "shop-web-v2-2@192.0.2.10",
        "Name": "web",
        "Tags": ["v2"],
        "Address": "192.0.2.10",
        "Port": 15443,
        "Meta": {"version": "v2", "spiffe": "spiffe://cluster.local/ns/shop/sa/web",
                 "project": "shop", "composemesh": "1"},
        "Check": {
            "CheckID": "service:shop-web-v2-2@192.0.2.10",
            "Name": "composemesh pilot of shop: web-v2 #2",
            "TTL": "30s",
            "DeregisterCriticalServiceAfter": "1m",
            "Status": "passing",
        },
    }


def test_an_unhealthy_instance_registers_critical() -> None:
    unhealthy = replace(WEB, healthy=False)
    assert convert.registration(unhealthy, SETTINGS)["Check"]["Status"] == "critical"


def test_ids_are_stable_and_differ_per_host_and_instance() -> None:
    assert convert.service_id(WEB, "192.0.2.10") == convert.service_id(WEB, "192.0.2.10")
    ids = {convert.service_id(WEB, "192.0.2.10"), convert.service_id(WEB, "192.0.2.11"),
           convert.service_id(replace(WEB, instance=3), "192.0.2.10")}
    assert len(ids) == 3
    assert convert.check_id("shop-web-1@::1") == "service:shop-web-1@::1"


def test_health_entry_of_the_docs() -> None:
    [entry] = recorded("health_service.json")
    assert convert.health_instance(entry) == CatalogInstance(
        service="redis", id="redis", node="foobar", address="10.1.10.12", port=8000,
        tags=("primary",), version=None, spiffe=None, datacenter="dc1", project=None)


def test_catalog_entry_of_the_docs() -> None:
    [entry] = recorded("catalog_service.json")
    assert convert.catalog_instance(entry) == CatalogInstance(
        service="web", id="32a2a47f7992:nodea:5000", node="t2.320", address="172.17.0.3",
        port=5000, tags=("prod",), version=None, spiffe=None, datacenter="dc1", project=None)


def test_a_composemesh_registration_reads_back() -> None:
    body = convert.registration(WEB, SETTINGS)
    entry = {
        "Node": {"Node": "host-b", "Address": "10.0.0.2", "Datacenter": "dc1"},
        "Service": {"ID": body["ID"], "Service": body["Name"], "Tags": body["Tags"],
                    "Address": body["Address"], "Port": body["Port"], "Meta": body["Meta"]},
        "Checks": [],
    }
    assert convert.health_instance(entry) == CatalogInstance(
        service="web", id="shop-web-v2-2@192.0.2.10", node="host-b", address="192.0.2.10",
        port=15443, tags=("v2",), version="v2", spiffe="spiffe://cluster.local/ns/shop/sa/web",
        datacenter="dc1", project="shop")


def test_no_service_address_means_the_nodes() -> None:
    [entry] = recorded("health_service.json")
    entry["Service"]["Address"] = ""
    entry["Node"]["Address"] = "10.9.9.9"
    assert convert.health_instance(entry).address == "10.9.9.9"
    [entry] = recorded("catalog_service.json")
    entry["ServiceAddress"] = ""
    assert convert.catalog_instance(entry).address == "192.168.10.10"


def test_project_only_from_a_composemesh_mark() -> None:
    [entry] = recorded("health_service.json")
    entry["Service"]["Meta"] = {"project": "shop", "version": "v1"}
    instance = convert.health_instance(entry)
    assert (instance.project, instance.version) == (None, "v1")
    entry["Service"]["Meta"]["composemesh"] = "1"
    assert convert.health_instance(entry).project == "shop"


def test_null_meta_and_tags_are_empty() -> None:
    [entry] = recorded("health_service.json")
    entry["Service"]["Meta"] = None
    entry["Service"]["Tags"] = None
    instance = convert.health_instance(entry)
    assert (instance.tags, instance.version) == ((), None)


@pytest.mark.parametrize(("change", "says"), [
    (lambda e: e.pop("Service"), "Service is a JSON null"),
    (lambda e: e["Service"].update(Port=0), "Service.Port is 0, not a port"),
    (lambda e: e["Service"].update(Port="8000"), "Service.Port is '8000'"),
    (lambda e: e["Service"].update(Service=""), "Service.Service"),
    (lambda e: e["Service"].update(Tags="primary"), "Service.Tags"),
    (lambda e: e["Node"].update(Node=None), "Node.Node"),
    (lambda e: e["Service"].update(Meta=[]), "Service.Meta is a JSON array"),
])
def test_a_malformed_health_entry_is_skipped_and_said_why(change: Any, says: str) -> None:
    good, bad = recorded("health_service.json")[0], recorded("health_service.json")[0]
    change(bad)
    with pytest.raises(ValueError) as caught:
        convert.health_instance(bad)
    assert says in str(caught.value)
    kept, problems = convert.health_instances([bad, good])
    assert kept == (convert.health_instance(good),)
    assert problems == (f"entry 0: {caught.value}",)


def test_bodies_that_are_not_the_documented_shape() -> None:
    with pytest.raises(ValueError, match="not an array"):
        convert.health_instances({"Node": {}})
    with pytest.raises(ValueError, match="not an object"):
        convert.service_names(["redis"])


def test_service_names_sorted() -> None:
    assert convert.service_names(recorded("catalog_services.json")) == (
        "consul", "postgresql", "redis")


@pytest.mark.parametrize(("header", "sent", "want"), [
    ("12", 0, 12),
    ("12", 12, 12),  # the wait ran out: the same index again
    ("15", 12, 15),
    ("3", 12, 0),  # went backwards (a restored or rebuilt cluster): start over
    ("0", 0, 1),  # below 1: 1, so the next query does block
    (" 7 ", 0, 7),
])
def test_blocking_index(header: str, sent: int, want: int) -> None:
    assert convert.blocking_index(header, sent) == want


def test_blocking_index_needs_the_header() -> None:
    with pytest.raises(ValueError, match="no X-Consul-Index"):
        convert.blocking_index(None, 0)
    with pytest.raises(ValueError, match="not a number"):
        convert.blocking_index("abc", 0)
