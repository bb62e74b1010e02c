"""The pilot's monitoring listener: its http_sd targets (pure), and the listener itself on a
real loopback socket: /metrics, /sd/prometheus, and nothing else.

Snapshots are fetched through the pilot's API (also on loopback here) with the caller given by
``tests/pilot/callers.Callers`` (the kernel's attestation is tested in test_attest.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from composemesh import __version__
from composemesh.model import wellknown as wk
from composemesh.model.mesh import MeshState, Workload
from composemesh.pilot.monitoring import PILOT_TARGET, make_monitoring_app, sd_targets
from composemesh.pilot.server import Pilot, make_app
from composemesh.pilot.traffic import host_port, metrics_address
from tests.pilot.callers import Callers

NET, OUTSIDE = "shop_default", "corp_lan"  # a project network the pilot is on, and one it is not
WEB = Workload(
    node="shop-web-netns-1",
    project="shop",
    compose_service="web",
    service="web",
    version="v1",
    addresses=("10.9.0.2",),
    running=True,
    proxy_container="shop-web-proxy-1",
    proxy_container_id="a" * 64,
    networks=((NET, "10.9.0.2"),),
)
REVIEWS_V2 = replace(WEB, node="shop-reviews-v2-netns-1", compose_service="reviews-v2",
                     service="reviews", version="v2", addresses=("10.9.0.7",),
                     networks=((NET, "10.9.0.7"),), proxy_container_id="b" * 64)
INGRESS = replace(WEB, node="shop-ingress-gateway-netns-1", compose_service=wk.INGRESS_GATEWAY,
                  service=wk.INGRESS_GATEWAY, addresses=("10.9.0.3",),
                  networks=((NET, "10.9.0.3"),), proxy_container_id="c" * 64)
# on an outside network too, whose address sorts first: the pilot cannot reach that one
EGRESS = replace(WEB, node="shop-egress-gateway-netns-1", compose_service=wk.EGRESS_GATEWAY,
                 service=wk.EGRESS_GATEWAY, addresses=("10.9.0.4", "10.1.0.5"),
                 networks=((OUTSIDE, "10.1.0.5"), (NET, "10.9.0.4")), proxy_container_id="d" * 64)
STOPPED = replace(WEB, node="shop-db-netns-1", compose_service="db", service="db",
                  addresses=("10.9.0.9",), networks=((NET, "10.9.0.9"),), running=False)
ELSEWHERE = replace(WEB, node="shop-legacy-netns-1", compose_service="legacy", service="legacy",
                    addresses=("10.1.0.8",), networks=((OUTSIDE, "10.1.0.8"),))
FIXED_NAMES = {  # as the parser names them: counters without _total
    "pilot_xds", "pilot_xds_pushes", "pilot_proxy_convergence_time", "pilot_xds_acks",
    "citadel_server_certificates", "pilot_services", "pilot_workloads", "pilot_docker_events",
    "pilot_info",
}


def sidecar_group(address: str, workload: str, service: str, version: str,
                  role: str = "sidecar") -> dict[str, object]:
    return {"targets": [f"{address}:15090"],
            "labels": {"__metrics_path__": "/stats/prometheus", "namespace": "shop",
                       "workload": workload, "service": service, "version": version,
                       "role": role}}


PILOT_GROUP = {"targets": ["composemesh-pilot:15014"],
               "labels": {"__metrics_path__": "/metrics", "namespace": "shop", "role": "pilot"}}


# --------------------------------------------------------------------------- pure


def test_the_address_scraped_is_on_a_network_the_pilot_is_on() -> None:
    pilot_on = frozenset({NET})
    assert metrics_address(EGRESS, pilot_on) == "10.9.0.4"
    assert metrics_address(EGRESS, None) == "10.1.0.5"  # the pilot's networks unknown: lowest
    assert metrics_address(ELSEWHERE, pilot_on) is None
    assert metrics_address(replace(WEB, networks=()), pilot_on) == "10.9.0.2"  # names unknown
    assert metrics_address(replace(WEB, addresses=(), networks=()), None) is None
    assert host_port("10.9.0.2", 15090) == "10.9.0.2:15090"
    assert host_port("fd00::5", 15090) == "[fd00::5]:15090"


def test_sd_targets_for_a_state_are_exactly_one_group_per_running_proxy_then_the_pilot() -> None:
    state = MeshState(project="shop",
                      workloads=(WEB, STOPPED, EGRESS, REVIEWS_V2, INGRESS, ELSEWHERE))
    assert sd_targets(state, frozenset({NET})) == [
        sidecar_group("10.9.0.4", "egress-gateway", "egress-gateway", "v1", "egress-gateway"),
        sidecar_group("10.9.0.3", "ingress-gateway", "ingress-gateway", "v1",
                      "ingress-gateway"),
        sidecar_group("10.9.0.7", "reviews-v2", "reviews", "v2"),
        sidecar_group("10.9.0.2", "web", "web", "v1"),
        PILOT_GROUP,
    ]
    assert sd_targets(MeshState(project="shop")) == [PILOT_GROUP]
    assert PILOT_TARGET == "composemesh-pilot:15014"
    six = replace(WEB, addresses=("fd00::2",), networks=((NET, "fd00::2"),))
    assert sd_targets(MeshState("shop", (six,)), frozenset({NET}), "10.9.0.1:15014") == [
        {**sidecar_group("x", "web", "web", "v1"), "targets": ["[fd00::2]:15090"]},
        {**PILOT_GROUP, "targets": ["10.9.0.1:15014"]},
    ]


# --------------------------------------------------------------------------- the listener

Body = Callable[[Pilot, TestClient, TestClient], Awaitable[None]]


def run(body: Body, workloads: tuple[Workload, ...] = (WEB,)) -> None:
    async def main() -> None:
        pilot = Pilot(MeshState(project="shop", workloads=workloads), attestor=Callers(WEB.node))
        pilot.synced = True
        monitoring = make_monitoring_app(pilot.metrics, lambda: pilot.state, frozenset({NET}))
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as api, \
                TestClient(TestServer(monitoring, host="127.0.0.1")) as mon:
            await body(pilot, api, mon)

    asyncio.run(main())


def test_get_metrics_parses_and_has_every_fixed_name_with_what_happened() -> None:
    async def body(pilot: Pilot, api: TestClient, mon: TestClient) -> None:
        assert (await api.get("/v1/snapshot")).status == 200
        resp = await mon.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        assert set(families) >= FIXED_NAMES
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        assert samples[("pilot_xds_pushes_total", (("type", "snapshot"),))] == 1.0
        assert samples[("pilot_xds_acks_total", (("outcome", "ack"),))] == 0.0
        assert samples[("pilot_xds_acks_total", (("outcome", "nack"),))] == 0.0
        assert samples[("citadel_server_certificates_total", (("outcome", "issued"),))] == 0.0
        assert samples[("pilot_workloads", ())] == 1.0
        assert samples[("pilot_xds", ())] == 1.0
        assert ("pilot_proxy_convergence_time_bucket", (("le", "+Inf"),)) in samples
        assert families["pilot_proxy_convergence_time"].type == "histogram"
        assert families["pilot_info"].samples[0].labels == {"version": __version__}
        om = await mon.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await om.text()).rstrip().endswith("# EOF")

    run(body)


def test_only_the_two_gets_are_served() -> None:
    async def body(pilot: Pilot, api: TestClient, mon: TestClient) -> None:
        for path in ("/metrics", "/sd/prometheus"):
            for method in ("POST", "PUT", "DELETE", "HEAD"):
                assert (await mon.request(method, path)).status == 405, (method, path)
        for path in ("/", "/v1/status", "/v1/ca", "/v1/snapshot", "/healthz/ready",
                     "/metrics/", "/sd", "/debug/configz"):
            assert (await mon.get(path)).status == 404, path
        assert (await mon.post("/v1/routes/web", json={"weights": {"v1": 1}})).status == 404
        assert (await mon.post("/v1/ca/rotate", json={"step": "begin"})).status == 404
        assert pilot.generation == 0 and pilot.overrides == {}

    run(body)


def test_a_20_kib_header_is_refused_before_any_handler_runs() -> None:
    async def body(pilot: Pilot, api: TestClient, mon: TestClient) -> None:
        before = (await (await mon.get("/metrics")).text())
        for path in ("/metrics", "/sd/prometheus"):
            resp = await mon.get(path, headers={"X-Big": "a" * 20 * 1024})
            assert resp.status in (400, 431), resp.status
            # the listener's own cap (4 KiB), below aiohttp's default of 8 KiB
            resp = await mon.get(path, headers={"X-Big": "a" * 6 * 1024})
            assert resp.status in (400, 431), resp.status
        assert (await mon.get("/metrics", headers={"X-Small": "a" * 1024})).status == 200
        assert (await (await mon.get("/metrics")).text()) == before
        assert pilot.generation == 0

    run(body)


def test_sd_lists_the_workloads_of_the_state_at_each_request() -> None:
    async def body(pilot: Pilot, api: TestClient, mon: TestClient) -> None:
        resp = await mon.get("/sd/prometheus")
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == [sidecar_group("10.9.0.2", "web", "web", "v1"), PILOT_GROUP]
        replica = replace(WEB, node="shop-web-2-netns-1", compose_service="web-2",
                          addresses=("10.9.0.12",), networks=((NET, "10.9.0.12"),))
        await pilot.publish(replace(pilot.state, workloads=(WEB, replica)))
        assert await (await mon.get("/sd/prometheus")).json() == [
            sidecar_group("10.9.0.12", "web-2", "web", "v1"),
            sidecar_group("10.9.0.2", "web", "web", "v1"),
            PILOT_GROUP,
        ]
        await pilot.publish(replace(pilot.state, workloads=(replica,)))
        text = await (await mon.get("/sd/prometheus")).text()
        assert json.loads(text) == [sidecar_group("10.9.0.12", "web-2", "web", "v1"),
                                    PILOT_GROUP]
        for secret in ("PRIVATE", "CERTIFICATE", "trust_bundle", "token", "settings"):
            assert secret not in text

    run(body)
