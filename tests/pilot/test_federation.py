"""What the Consul catalog adds to each proxy's snapshot: the documented rules, one by one."""

from __future__ import annotations

from composemesh.model.consul import CatalogInstance, ConsulView
from composemesh.model.east_west import IMPORTED_VIP_NETWORK
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import parse_settings
from composemesh.pilot.build import build_state
from composemesh.pilot.federation import imported
from composemesh.pilot.render import PushIndex

TD = "cluster.local"


def workload(node: str, service: str, version: str = "v1", address: str = "10.0.0.1") -> Workload:
    return Workload(node=node, project="a", compose_service=service, service=service,
                    version=version, addresses=(address,), running=True,
                    networks=(("a_default", address),))


def mesh_instance(service: str, version: str, project: str = "b", n: int = 1,
                  spiffe: str | None = None) -> CatalogInstance:
    return CatalogInstance(
        service=service, id=f"{project}-{service}-{n}@192.0.2.20", node="host-b",
        address="192.0.2.20", port=15443, tags=(version,), version=version,
        spiffe=spiffe if spiffe is not None else f"spiffe://{TD}/ns/{project}/sa/{service}",
        project=project)


def vm_instance(service: str, address: str = "192.0.2.77", port: int = 5432) -> CatalogInstance:
    return CatalogInstance(service=service, id=f"{service}-vm", node="vm-1", address=address,
                           port=port)


def state(*instances: CatalogInstance, workloads: tuple[Workload, ...] = ()) -> MeshState:
    by_service: dict[str, tuple[CatalogInstance, ...]] = {}
    for instance in instances:
        by_service[instance.service] = (*by_service.get(instance.service, ()), instance)
    view = ConsulView(reachable=True, imported=by_service)
    settings = parse_settings({})
    built = build_state("a", workloads, settings, {}, consul=view)
    assert built.consul == view
    return built


def test_a_mesh_instance_elsewhere_is_reached_at_its_gateway_by_sni_with_its_own_identity() -> None:
    found = imported(state(mesh_instance("payments", "v2")))
    (endpoint,) = found.endpoints["payments"]
    assert (endpoint.address, endpoint.port, endpoint.locality) == ("192.0.2.20", 15443, "remote")
    assert endpoint.peer == f"spiffe://{TD}/ns/b/sa/payments"
    assert endpoint.sni == f"v2_.payments.b.svc.{TD}"
    assert not endpoint.plaintext
    assert list(found.vips) == ["payments"]  # no local service of that name: it gets a VIP
    assert found.vips["payments"].startswith(IMPORTED_VIP_NETWORK.split(".0.0/")[0])


def test_local_first_the_remote_instances_are_added_after_the_local_ones() -> None:
    here = (workload("a-reviews-netns-1", "reviews"),)
    built = state(mesh_instance("reviews", "v1"), workloads=here)
    snapshot = PushIndex.build(built).render(here[0])
    endpoints = snapshot.settings.services["reviews"]
    assert [e.locality for e in endpoints] == ["local", "remote"]
    assert "reviews" not in snapshot.settings.dns  # Docker's DNS answers the local name
    assert snapshot.settings.federated is False  # no consul section in these settings


def test_a_version_only_elsewhere_is_in_the_split_so_a_split_spans_hosts() -> None:
    here = (workload("a-reviews-netns-1", "reviews"),)
    built = state(mesh_instance("reviews", "v2"), workloads=here)
    versions = {d.version for r in built.routing["reviews"].routes for d in r.destinations}
    assert versions == {"v1", "v2"}
    assert "payments" not in built.routing
    assert "payments" in state(mesh_instance("payments", "v1")).routing


def test_a_plaintext_entry_never_stands_in_for_a_mesh_service() -> None:
    here = (workload("a-db-netns-1", "db"),)
    found = imported(state(vm_instance("db"), workloads=here))
    assert "db" not in found.endpoints
    assert "plaintext instance is never a failover" in found.left_out[0]


def test_a_plaintext_entry_of_a_name_that_is_no_mesh_service_is_plain_tcp_to_it() -> None:
    (endpoint,) = imported(state(vm_instance("legacy-db"))).endpoints["legacy-db"]
    assert endpoint.plaintext and (endpoint.address, endpoint.port) == ("192.0.2.77", 5432)
    assert endpoint.peer == "" and endpoint.sni == ""


def test_a_registration_claiming_another_identity_or_trust_domain_is_left_out() -> None:
    other_service = mesh_instance("payments", "v1", spiffe=f"spiffe://{TD}/ns/b/sa/admin")
    other_domain = mesh_instance("payments", "v1", n=2, spiffe="spiffe://evil.example/ns/b/sa/payments")
    garbage = mesh_instance("payments", "v1", n=3, spiffe="https://x")
    found = imported(state(other_service, other_domain, garbage))
    assert "payments" not in found.endpoints
    reasons = " ".join(found.left_out)
    assert "names service 'admin'" in reasons and "'evil.example'" in reasons
    assert "Meta.spiffe" in reasons


def test_a_hostname_address_is_left_out_and_said_why() -> None:
    found = imported(state(vm_instance("legacy", address="db.internal")))
    assert not found.endpoints and "not an IP address" in found.left_out[0]


def test_the_mesh_own_names_are_never_taken_from_the_catalog() -> None:
    found = imported(state(vm_instance("consul"), vm_instance("east-west-gateway"),
                           vm_instance("composemesh-pilot")))
    assert not found.endpoints and not found.vips


def test_a_name_keeps_its_vip_when_others_come_and_go() -> None:
    one = imported(state(mesh_instance("payments", "v1"))).vips
    more = imported(state(mesh_instance("payments", "v1"), vm_instance("billing"),
                          vm_instance("search"))).vips
    assert more["payments"] == one["payments"]
    assert len(set(more.values())) == 3


def test_a_catalog_change_is_a_new_snapshot_version_the_same_catalog_the_same() -> None:
    here = (workload("a-web-netns-1", "web"),)
    first = PushIndex.build(state(mesh_instance("payments", "v1"), workloads=here)).render(here[0])
    again = PushIndex.build(state(mesh_instance("payments", "v1"), workloads=here)).render(here[0])
    two = (mesh_instance("payments", "v1"), mesh_instance("payments", "v1", n=2))
    moved = PushIndex.build(state(*two, workloads=here)).render(here[0])
    assert first.version == again.version != moved.version
    assert len(moved.settings.services["payments"]) == 2


def test_a_catalog_name_of_a_local_service_outside_the_mesh_is_left_out() -> None:
    """``db`` runs in this project with ``composemesh.enable: false``: Docker's DNS answers
    ``db`` here, so the catalog's ``db`` (plaintext or not) never takes its place."""
    view = ConsulView(reachable=True, imported={"db": (vm_instance("db"),),
                                                "payments": (mesh_instance("payments", "v1"),)})
    built = build_state("a", (), parse_settings({}), {},
                        MeshState(project="a", local_names=frozenset({"db", "web"})),
                        consul=view)
    assert built.local_names == {"db", "web"}
    found = imported(built)
    assert set(found.endpoints) == {"payments"} and "db" not in found.vips
    assert "the local one wins" in found.left_out[0]


def test_status_says_what_is_exported_imported_and_left_out_and_the_table_shows_it() -> None:
    import io

    from rich.console import Console

    from composemesh.cli_render import consul_table
    from composemesh.pilot.federation import consul_status

    settings = parse_settings({"consul": {"address": "http://consul:8500",
                                          "host_address": "192.0.2.10"}}, environ={})
    view = ConsulView(reachable=True, exported={"web": ("a-web-1@192.0.2.10",)},
                      imported={"payments": (mesh_instance("payments", "v2"),),
                                "db": (vm_instance("db"),)})
    here = (workload("a-db-netns-1", "db"),)
    built = build_state("a", here, settings, {}, consul=view)
    status = consul_status(built)
    assert status is not None and status["reachable"] is True
    assert status["exported"] == {"web": ["a-web-1@192.0.2.10"]}
    assert [i["used"] for i in status["imported"]["payments"]] == [True]
    assert [i["used"] for i in status["imported"]["db"]] == [False]  # plaintext, a mesh name
    assert list(status["vips"]) == ["payments"]
    console = Console(file=io.StringIO(), width=200)
    console.print(consul_table(status))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "answering" in text and "192.0.2.10:15443 (east-west gateway)" in text
    assert "1 of 1" in text and "192.0.2.20:15443" in text and "left out" in text
    assert consul_status(build_state("a", here, parse_settings({}), {})) is None
    down = consul_status(build_state("a", here, settings, {}, consul=ConsulView(
        error="Consul at http://consul:8500 is unreachable", error_kind="unreachable")))
    console = Console(file=io.StringIO(), width=200)
    console.print(consul_table(down or {}))
    said = " ".join(console.file.getvalue().split())  # type: ignore[attr-defined]
    assert "not answering (Consul at http://consul:8500 is unreachable)" in said


def test_route_may_send_a_share_to_a_version_that_runs_only_on_another_host() -> None:
    import asyncio

    from composemesh.pilot.server import Pilot

    here = (workload("a-reviews-netns-1", "reviews"),)
    pilot = Pilot(state(mesh_instance("reviews", "v2"), workloads=here))
    answer = asyncio.run(pilot.set_weights("reviews", {"v1": 80, "v2": 20}))
    assert answer["new"] == {"v1": 80, "v2": 20}
    routes = pilot.state.routing["reviews"].routes
    assert {(d.version, d.weight) for d in routes[-1].destinations} == {("v1", 80), ("v2", 20)}


def test_one_push_reads_the_catalog_once_and_a_new_view_is_read_anew() -> None:
    built = state(mesh_instance("payments", "v1"))
    assert imported(built) is imported(built)  # kept for the same frozen values
    moved = state(mesh_instance("payments", "v1"), mesh_instance("payments", "v1", n=2))
    assert len(imported(moved).endpoints["payments"]) == 2
    assert len(imported(built).endpoints["payments"]) == 1  # the old view: its own answer
