"""The pure rewrite: invariants over every case file, then what each special shape must become."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.inject import inject
from composemesh.inject.compose_syntax import NETNS_KEYS
from composemesh.inject.templates import PILOT_URL, PILOT_VOLUME, SOCKET_VOLUME
from composemesh.model import wellknown as wk
from composemesh.model.ca_config import PILOT_ROOT_CERT, PILOT_ROOT_KEY, CAConfig, parse_ca_config
from composemesh.model.labels import parse_labels

from .casefiles import (
    CASES_DIR,
    case_names,
    holder_of,
    injected,
    labels_of,
    loaded,
    role_of,
    user_services,
)

CASES = case_names()


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 28


# --------------------------------------------------------------------------- helpers


def services_of(name: str) -> dict[str, Any]:
    return injected(name).model["services"]


def by_role(services: dict[str, Any], role: str) -> dict[str, Any]:
    return {n: s for n, s in services.items() if role_of(s) == role}


def volume_sources(svc: dict[str, Any]) -> list[str]:
    """The sources of a service's volumes, long or short syntax."""
    out = []
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            out.append(str(volume.get("source", "")))
        else:
            out.append(str(volume).split(":", 1)[0])
    return out


def socket_mounts(svc: dict[str, Any]) -> list[Any]:
    """A service's mounts of the pilot's socket volume, as written."""
    return [v for v, source in zip(svc.get("volumes") or [], volume_sources(svc), strict=True)
            if source == SOCKET_VOLUME]


def as_map(value: Any) -> dict[str, Any]:
    """sysctls/depends_on in either form, as a mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    out = {}
    for item in value:
        key, _, val = str(item).partition("=")
        out[key] = val
    return out


def link_name(link: str) -> tuple[str, str]:
    target, _, alias = link.partition(":")
    return target, alias or target


def assert_same_links(before: list[str], after: list[str]) -> None:
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        (old_target, old_alias), (new_target, new_alias) = link_name(old), link_name(new)
        assert new_alias == old_alias
        assert new_target == old_target or new_target.endswith("-netns"), (old, new)


def assert_same_networks(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert list(after) == list(before)
    for net, spec in before.items():
        spec = spec or {}
        new = after[net] or {}
        old_aliases = spec.get("aliases") or []
        assert new.get("aliases", [])[: len(old_aliases)] == old_aliases, net
        rest = {k: v for k, v in spec.items() if k != "aliases"}
        assert {k: v for k, v in new.items() if k != "aliases"} == rest, net


def meshed_apps(name: str) -> list[str]:
    """Apps with a holder of their own (not joiners)."""
    return [
        row.service
        for row in injected(name).services
        if row.netns is not None and row.netns == wk.netns_service(row.service)
    ]


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("case", CASES)
def test_every_meshed_app_has_one_holder_and_one_proxy(case: str) -> None:
    result = injected(case)
    services = result.model["services"]
    holders = by_role(services, wk.ROLE_NETNS)
    proxies = by_role(services, wk.ROLE_PROXY)
    apps = meshed_apps(case)
    for app in apps:
        netns = wk.netns_service(app)
        assert services[app]["network_mode"] == f"service:{netns}"
        assert [n for n, s in holders.items() if labels_of(s)[wk.LABEL_OF] == app] == [netns]
        mine = [n for n, s in proxies.items() if s["network_mode"] == f"service:{netns}"]
        assert mine == [wk.proxy_service(app)]
        proxy = proxies[mine[0]]
        assert labels_of(proxy)[wk.LABEL_OF] == app
        assert proxy["user"] == f"{wk.PROXY_UID}:{wk.PROXY_UID}"
        assert proxy["depends_on"][wk.PILOT_SERVICE]["condition"] == "service_healthy"
        deps = services[app]["depends_on"]
        assert deps[wk.proxy_service(app)]["condition"] == "service_healthy"
        assert deps[netns]["condition"] == "service_started"
        holder = holders[netns]
        assert holder["cap_add"] == ["NET_ADMIN"]  # iptables (nf_tables) needs no more
        assert holder["command"] == ["composemesh", "netns"]
        mesh_service = labels_of(holder)[wk.LABEL_SERVICE]
        for net, spec in (holder.get("networks") or {}).items():
            assert mesh_service in spec["aliases"], net
            assert labels_of(holder)[wk.LABEL_OF] in spec["aliases"], net
    # Every holder and proxy belongs to one of these apps: nothing dangling.
    assert {labels_of(s)[wk.LABEL_OF] for s in holders.values()} == set(apps)
    assert {labels_of(s)[wk.LABEL_OF] for s in proxies.values()} == set(apps)
    pilots = by_role(services, wk.ROLE_PILOT)
    assert list(pilots) == ([wk.PILOT_SERVICE] if apps else [])


@pytest.mark.parametrize("case", CASES)
def test_every_injected_container_is_hardened(case: str) -> None:
    """Every capability dropped but what each needs (a holder: NET_ADMIN only; NET_RAW,
    which forging addresses and ARP answers takes, nowhere), no gaining privileges, and the
    pilot's socket volume mounted by the pilot (read-write) and the proxies (read-only) only."""
    result = injected(case)
    model = result.model
    services = model["services"]
    added = {a.name for a in result.added}
    assert added == {n for n, s in services.items() if role_of(s) in
                     (wk.ROLE_NETNS, wk.ROLE_PROXY, wk.ROLE_PILOT)}
    for name in added:
        svc = services[name]
        role = role_of(svc)
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        assert "NET_RAW" not in (svc.get("cap_add") or []), name
        assert "privileged" not in svc, name
        assert "ports" not in svc or role == wk.ROLE_NETNS, name  # a holder: the app's own
        if role == wk.ROLE_NETNS:
            assert svc["cap_add"] == ["NET_ADMIN"], name
            assert socket_mounts(svc) == [], name
        elif role == wk.ROLE_PROXY:
            assert "cap_add" not in svc, name
            assert socket_mounts(svc) == [{"type": "volume", "source": SOCKET_VOLUME,
                                           "target": wk.PILOT_SOCKET_DIR, "read_only": True}]
            assert svc["environment"]["COMPOSEMESH_PILOT_URL"] == PILOT_URL
        else:
            assert name == wk.PILOT_SERVICE
            assert "cap_add" not in svc
            assert svc["pid"] == "host"  # the kernel's PID of a socket peer names it here
            assert "expose" not in svc
            assert socket_mounts(svc) == [{"type": "volume", "source": SOCKET_VOLUME,
                                           "target": wk.PILOT_SOCKET_DIR}]
    for name, svc in services.items():
        if name not in added:  # the user's: an app never reaches the pilot's socket
            assert SOCKET_VOLUME not in volume_sources(svc), name
    if added:
        assert model["volumes"][SOCKET_VOLUME] is None
        assert model["volumes"][PILOT_VOLUME] is None
    else:
        assert SOCKET_VOLUME not in (model.get("volumes") or {})


def test_the_socket_volume_is_not_the_apps_even_when_named_so() -> None:
    """A user volume of another name is kept as written; the apps get no socket mount."""
    model = {
        "services": {"web": {"image": "x", "volumes": ["data:/data"]}},
        "volumes": {"data": None},
    }
    result = inject(model).model
    assert result["services"]["web"]["volumes"] == ["data:/data"]
    assert result["volumes"] == {"data": None, PILOT_VOLUME: None, SOCKET_VOLUME: None}
    assert SOCKET_VOLUME == "composemesh-pilot-socket"


@pytest.mark.parametrize("case", CASES)
def test_plain_enabled_services_are_meshed(case: str) -> None:
    """A service with its own network (no network_mode) and no enable=false gets a sidecar."""
    model = loaded(case).model
    apps = set(meshed_apps(case))
    for name, svc in user_services(model).items():
        if parse_labels(labels_of(svc), compose_service=name).enabled and (
            "network_mode" not in svc or svc["network_mode"] == "bridge"
        ):
            assert name in apps, name


@pytest.mark.parametrize("case", CASES)
def test_nothing_of_the_users_file_is_lost(case: str) -> None:
    before = loaded(case).model
    after = injected(case).model
    for key, value in before.items():
        if key == "volumes":  # the pilot's state and socket volumes are the additions
            drop = (PILOT_VOLUME, SOCKET_VOLUME)
            assert {k: v for k, v in after[key].items() if k not in drop} == {
                k: v for k, v in value.items() if k not in drop
            }
        elif key != "services":
            assert after[key] == value, key
    assert set(before) <= set(after)
    for name, svc in user_services(before).items():
        app = after["services"][name]
        holder = holder_of(after, name)
        owner = holder is not None and labels_of(holder)[wk.LABEL_OF] == name
        replicated = wk.LABEL_INSTANCE in labels_of(app) and owner
        for key, value in svc.items():
            where = f"{name}.{key}"
            if key == "network_mode" and app.get(key) == value:  # meshed before: kept
                continue
            if owner and (key in NETNS_KEYS or key == "network_mode"):
                assert holder is not None
                assert key not in app or key == "network_mode", where
                if key == "networks":
                    assert_same_networks(value, holder[key])
                elif key == "links":
                    assert_same_links(value, holder[key])
                elif key == "ports" and replicated:
                    assert holder[key] == value, where  # instance 1 keeps every port
                else:
                    assert holder[key] == value, where
            elif key == "sysctls" and owner:
                assert holder is not None
                merged = {**as_map(app.get(key)), **as_map(holder.get(key))}
                assert merged == as_map(value), where
            elif key == "depends_on":
                deps = as_map(app[key])
                for dep, condition in as_map(value).items():
                    assert deps[dep] == condition, where
            elif key == "labels":
                new = labels_of(app)
                for label, text in labels_of(svc).items():
                    assert new[label] == text, f"{where} {label}"
            elif key == "links":
                assert_same_links(value, app[key])
            elif key == "network_mode" and holder is not None:  # joined a meshed namespace
                assert app[key] == f"service:{next(iter(_holder_names(after, app)))}"
            elif replicated and key == "scale":
                assert key not in app
            elif replicated and key == "deploy":
                rest = {k: v for k, v in value.items() if k != "replicas"}
                assert app.get(key, {}) == rest, where
            else:
                assert app[key] == value, where


def _holder_names(model: dict[str, Any], app: dict[str, Any]) -> list[str]:
    return [str(app["network_mode"]).removeprefix("service:")]


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_changes_nothing(case: str) -> None:
    once = injected(case)
    twice = inject(once.model)
    assert twice.model == once.model
    assert json.dumps(twice.model) == json.dumps(once.model)  # same order too
    assert [a for a in twice.added] == [a for a in once.added]


@pytest.mark.parametrize("case", CASES)
def test_input_is_not_mutated(case: str) -> None:
    model = loaded(case).model
    before = copy.deepcopy(model)
    result = inject(model)
    assert model == before
    result.model["services"].clear()
    assert model == before


def _external(model: dict[str, Any]) -> set[str]:
    return {n for n, spec in (model.get("networks") or {}).items()
            if isinstance(spec, dict) and spec.get("external")}


def _namespace_of(model: dict[str, Any], name: str) -> str:
    """The service whose network endpoints ``name``'s container uses (its holder, or it)."""
    holder = holder_of(model, name)
    mode = str(model["services"][name].get("network_mode", ""))
    return mode.removeprefix("service:") if holder is not None else name


@pytest.mark.parametrize("case", CASES)
def test_every_name_a_container_answered_to_still_resolves(case: str) -> None:
    """On each network a service was on, whatever owns its namespace now answers to its
    service name, its container_name and its aliases; a link still names it."""
    before = loaded(case).model
    after = injected(case).model
    for name, svc in user_services(before).items():
        if "network_mode" in svc or name not in after["services"]:
            continue  # no endpoints of its own (or bridge: no aliases there either way)
        owner = after["services"][_namespace_of(after, name)]
        for net, spec in (svc.get("networks") or {}).items():
            names = {name, *((spec or {}).get("aliases") or ())}
            if svc.get("container_name"):
                names.add(svc["container_name"])
            if role_of(owner) is None:
                continue  # not meshed: its own endpoints, untouched
            assert names <= set(owner["networks"][net]["aliases"]), (name, net)
    for name, svc in user_services(before).items():
        if not svc.get("links") or name not in after["services"]:
            continue
        linker = after["services"][_namespace_of(after, name)]
        now = {link_name(str(link)) for link in linker.get("links") or ()}
        for link in svc["links"]:
            target, alias = link_name(str(link))
            assert (_namespace_of(after, target), alias) in now, (name, link)


@pytest.mark.parametrize("case", CASES)
def test_nothing_the_mesh_adds_joins_an_external_network(case: str) -> None:
    """The pilot is on the project's own networks only; a proxy has no endpoint; a holder
    is on exactly the networks its app was on."""
    before = loaded(case).model
    after = injected(case).model
    external = _external(after)
    for name, svc in after["services"].items():
        role = role_of(svc)
        if role == wk.ROLE_PILOT:
            assert not set(svc.get("networks") or ()) & external, name
            if "networks" not in svc:
                assert svc["network_mode"] == "none"
        elif role == wk.ROLE_PROXY:
            assert str(svc["network_mode"]).startswith("service:"), name
            assert "networks" not in svc, name
        elif role == wk.ROLE_NETNS:
            app = labels_of(svc)[wk.LABEL_OF]
            origin = before["services"].get(app) or before["services"].get(
                app.rpartition("-")[0], {})
            if "network_mode" not in origin and "networks" in origin:
                assert set(svc["networks"]) == set(origin["networks"]), name


@pytest.mark.parametrize("case", CASES)
def test_holders_start_in_their_apps_order(case: str) -> None:
    """A holder starts after the namespace of each service its app depends on."""
    after = injected(case).model
    services = after["services"]
    for name, holder in services.items():
        if role_of(holder) != wk.ROLE_NETNS:
            continue
        app = labels_of(holder)[wk.LABEL_OF]
        for dep, spec in (services[app].get("depends_on") or {}).items():
            if role_of(services.get(dep, {})) is not None:
                continue
            target = _namespace_of(after, dep)
            if target != name:
                assert target in holder["depends_on"], (name, dep)
                assert holder["depends_on"][target]["required"] == spec.get("required", True)


def _fixed_on(svc: dict[str, Any]) -> set[str]:
    nets = svc.get("networks") if "network_mode" not in svc else None
    return {n for n, spec in (nets or {}).items()
            if spec and (spec.get("ipv4_address") or spec.get("ipv6_address"))}


def _starts_after(services: dict[str, Any], later: str, first: str) -> bool:
    """Whether ``later`` waits (through depends_on and network_mode) for ``first``."""
    seen, todo = set(), [later]
    while todo:
        name = todo.pop()
        if name == first and name != later:
            return True
        if name in seen or name not in services:
            continue
        seen.add(name)
        svc = services[name]
        todo.extend(svc.get("depends_on") or ())
        mode = str(svc.get("network_mode", ""))
        if mode.startswith("service:"):
            todo.append(mode.removeprefix("service:"))
    return False


@pytest.mark.parametrize("case", CASES)
def test_no_injected_container_can_take_a_fixed_address_first(case: str) -> None:
    """A holder or the pilot with no fixed address on a network starts after every service
    with one there, or (the apps' own order says otherwise) a warning says so."""
    result = injected(case)
    services = result.model["services"]
    fixed: dict[str, list[str]] = {}
    for name, svc in services.items():
        for net in _fixed_on(svc):
            fixed.setdefault(net, []).append(name)
    for name, svc in services.items():
        if role_of(svc) not in (wk.ROLE_NETNS, wk.ROLE_PILOT) or "network_mode" in svc:
            continue
        for net in set(svc.get("networks") or ()) - _fixed_on(svc):
            for first in fixed.get(net, ()):
                if first == name:
                    continue
                if _starts_after(services, first, name):
                    assert any(f"{name!r} starts before {first!r}" in w
                               for w in result.warnings), (name, first)
                else:
                    assert _starts_after(services, name, first), (name, first)


# --------------------------------------------------------------------------- per case


def test_single_service_gets_holder_proxy_and_pilot() -> None:
    services = services_of("single")
    assert list(services) == ["web", "web-netns", "web-proxy", wk.PILOT_SERVICE]
    holder, proxy, pilot = (services[n] for n in ("web-netns", "web-proxy", wk.PILOT_SERVICE))
    assert holder["image"] == wk.MESH_IMAGE
    assert holder["restart"] == "unless-stopped"
    assert holder["networks"] == {"default": {"aliases": ["web"]}}
    assert labels_of(holder) == {
        wk.LABEL_ROLE: wk.ROLE_NETNS,
        wk.LABEL_OF: "web",
        wk.LABEL_SERVICE: "web",
        wk.LABEL_VERSION: "v1",
    }
    assert holder["cap_drop"] == ["ALL"]
    assert holder["cap_add"] == ["NET_ADMIN"]
    assert holder["security_opt"] == ["no-new-privileges:true"]
    assert proxy["command"] == ["composemesh", "proxy"]
    assert proxy["cap_drop"] == ["ALL"]
    assert "cap_add" not in proxy
    assert proxy["security_opt"] == ["no-new-privileges:true"]
    assert proxy["volumes"] == [
        {"type": "volume", "source": "composemesh-pilot-socket", "target": "/run/composemesh",
         "read_only": True}
    ]
    assert proxy["environment"] == {
        "COMPOSEMESH_PILOT_URL": PILOT_URL,
        "COMPOSEMESH_SERVICE": "web",
        "COMPOSEMESH_VERSION": "v1",
        "COMPOSEMESH_COMPOSE_SERVICE": "web",
    }
    # a cheap check (python3 -m, socket only): a dozen proxies run it every 2 s
    assert proxy["healthcheck"]["test"] == ["CMD", "python3", "-m", "composemesh.healthcheck",
                                            "15021"]
    assert PILOT_URL == "unix:///run/composemesh/pilot.sock"
    assert wk.PILOT_SOCKET == "/run/composemesh/pilot.sock"
    assert pilot["command"] == ["composemesh", "pilot"]
    assert "ports" not in pilot  # its API is on the socket only: nothing on the host's ports
    assert pilot["pid"] == "host"
    assert pilot["cap_drop"] == ["ALL"]
    assert "cap_add" not in pilot
    assert pilot["security_opt"] == ["no-new-privileges:true"]
    assert pilot["volumes"] == [
        {"type": "bind", "source": "/var/run/docker.sock", "target": "/var/run/docker.sock"},
        {"type": "volume", "source": PILOT_VOLUME, "target": "/var/lib/composemesh"},
        {"type": "volume", "source": "composemesh-pilot-socket", "target": "/run/composemesh"},
    ]
    assert pilot["networks"] == {"default": None}  # it scrapes the proxies' metrics there
    assert pilot["healthcheck"]["test"] == ["CMD", "python3", "-m", "composemesh.healthcheck",
                                            "unix:/run/composemesh/pilot.sock"]
    assert injected("single").model["volumes"] == {PILOT_VOLUME: None, SOCKET_VOLUME: None}
    assert "environment" not in pilot  # no x-composemesh section
    assert services["web"] == {
        "image": "nginx:1.27",
        "network_mode": "service:web-netns",
        "depends_on": {
            "web-netns": {"condition": "service_started", "required": True, "restart": True},
            "web-proxy": {"condition": "service_healthy", "required": True},
        },
    }
    assert injected("single").warnings == ()


def test_bookinfo_versions_share_the_mesh_service_alias() -> None:
    services = services_of("bookinfo")
    for version in ("v1", "v2", "v3"):
        holder = services[f"reviews-{version}-netns"]
        assert holder["networks"]["default"]["aliases"] == [f"reviews-{version}", "reviews"]
        assert labels_of(holder)[wk.LABEL_VERSION] == version
        assert labels_of(holder)[wk.LABEL_SERVICE] == "reviews"
        env = services[f"reviews-{version}-proxy"]["environment"]
        assert env["COMPOSEMESH_SERVICE"] == "reviews"
        assert env["COMPOSEMESH_COMPOSE_SERVICE"] == f"reviews-{version}"
    assert services["productpage-netns"]["ports"][0]["published"] == "9080"
    assert "ports" not in services["productpage"]
    assert services["productpage"]["depends_on"]["details"]["condition"] == "service_started"


def test_ports_of_every_syntax_move_to_the_holder() -> None:
    before = loaded("ports").model["services"]["gateway"]["ports"]
    services = services_of("ports")
    assert services["gateway-netns"]["ports"] == before
    protocols = {p.get("protocol") for p in before}
    assert protocols == {"tcp", "udp"}
    assert any(p.get("host_ip") == "::1" for p in before)
    assert "ports" not in services["gateway"]


def test_network_aliases_and_addresses_stay_with_the_holder() -> None:
    services = services_of("network_aliases")
    nets = services["api-netns"]["networks"]
    assert nets["front"]["aliases"] == ["api.internal", "public-api", "api"]
    assert nets["front"]["ipv4_address"] == "172.29.10.10"
    assert nets["back"]["aliases"] == ["api"]  # already there: not repeated
    assert services["db-netns"]["networks"]["back"]["priority"] == 100
    assert services[wk.PILOT_SERVICE]["networks"] == {"back": None, "front": None}


def test_pilot_joins_every_network_of_the_project_a_holder_is_on() -> None:
    pilot = services_of("multi_networks")[wk.PILOT_SERVICE]
    assert set(pilot["networks"]) == {"front", "back", "default", "internal-only"}
    external = services_of("external_network")[wk.PILOT_SERVICE]
    assert set(external["networks"]) == {"default"}  # never the external "shared"


def test_namespace_settings_move_to_the_holder() -> None:
    services = services_of("host_settings")
    holder, app = services["legacy-netns"], services["legacy"]
    for key in ("hostname", "domainname", "dns", "dns_search", "dns_opt", "extra_hosts",
                "mac_address"):
        assert key in holder, key
        assert key not in app, key
    assert holder["hostname"] == "legacy-box"
    assert services["single_dns-netns"]["dns"] in ("8.8.8.8", ["8.8.8.8"])


def test_expose_moves_to_the_holder() -> None:
    services = services_of("expose")
    assert services["backend-netns"]["expose"] == ["3000", "8000-8002", "9000/udp"]
    assert "expose" not in services["backend"]


def test_app_keeps_volumes_healthcheck_and_the_rest() -> None:
    db = services_of("volumes")["db"]
    assert db["volumes"] == loaded("volumes").model["services"]["db"]["volumes"]
    assert "volumes" not in services_of("volumes")["db-netns"]
    api = services_of("healthcheck")["api"]
    assert api["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "healthcheck" not in services_of("healthcheck")["api-netns"]


def test_depends_on_keeps_conditions_and_gains_the_sidecar() -> None:
    services = services_of("depends_on")
    api = services["api"]["depends_on"]
    assert api["db"] == {"condition": "service_healthy", "required": True, "restart": True}
    assert api["migrate"]["condition"] == "service_completed_successfully"
    assert api["optional"]["required"] is False
    assert api["api-proxy"]["condition"] == "service_healthy"
    assert list(services["web"]["depends_on"])[:2] == ["api", "cache"]


def test_list_form_depends_on_becomes_a_mapping() -> None:
    model = {"services": {"a": {"image": "x", "depends_on": ["b"]}, "b": {"image": "y"}}}
    deps = inject(model).model["services"]["a"]["depends_on"]
    assert deps == {
        "b": {"condition": "service_started", "required": True},
        "a-netns": {"condition": "service_started", "required": True, "restart": True},
        "a-proxy": {"condition": "service_healthy", "required": True},
    }


def test_holder_and_proxy_follow_the_apps_profiles() -> None:
    services = services_of("profiles")
    for name in ("debug-netns", "debug-proxy"):
        assert services[name]["profiles"] == ["debug", "tools"]
    assert services["metrics-proxy"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["web-netns"]
    assert "profiles" not in services[wk.PILOT_SERVICE]


def test_replicas_expand_into_instances() -> None:
    result = injected("replicas")
    services = result.model["services"]
    names = [n for n in services if n.startswith("worker")]
    assert names == [
        "worker", "worker-netns", "worker-proxy",
        "worker-2", "worker-2-netns", "worker-2-proxy",
        "worker-3", "worker-3-netns", "worker-3-proxy",
    ]
    for index, inst in enumerate(("worker", "worker-2", "worker-3"), start=1):
        app = services[inst]
        assert labels_of(app)[wk.LABEL_SERVICE] == "worker"
        assert labels_of(app)[wk.LABEL_INSTANCE] == str(index)
        assert labels_of(app)[wk.LABEL_VERSION] == "v2"
        assert app["deploy"] == {"resources": {"limits": {"memory": "67108864"}}}  # 64M
        holder = services[f"{inst}-netns"]
        assert labels_of(holder)[wk.LABEL_INSTANCE] == str(index)
        assert labels_of(holder)[wk.LABEL_SERVICE] == "worker"
        assert "worker" in holder["networks"]["default"]["aliases"]
        assert inst in holder["networks"]["default"]["aliases"]
    published = [p.get("published") for p in services["worker-netns"]["ports"]]
    assert published == ["8080", None, "7000-7010"]
    for inst in ("worker-2", "worker-3"):
        ports = services[f"{inst}-netns"]["ports"]
        assert [p.get("published") for p in ports] == [None, "7000-7010"]
    client = services["client"]["depends_on"]
    for inst in ("worker", "worker-2", "worker-3"):
        assert client[inst]["condition"] == "service_healthy"
        assert services["watcher"]["depends_on"][inst]["condition"] == "service_started"
    assert any("3 replicas expanded" in w and "worker-3" in w for w in result.warnings)
    assert (
        "service 'worker': published port 8080:80/tcp stays on the first instance only "
        "(a fixed host port can be bound once)"
    ) in result.warnings


def test_scale_expands_too() -> None:
    services = services_of("scale")
    assert "scale" not in services["api"]
    assert "scale" not in services["api-2"]
    assert labels_of(services["api-2"])[wk.LABEL_SERVICE] == "backend"
    assert services["api-2-netns"]["expose"] == ["8080"]
    assert services["api-2-proxy"]["environment"]["COMPOSEMESH_SERVICE"] == "backend"
    assert set(services["frontend"]["depends_on"]) >= {"api", "api-2"}


def test_zero_replicas_keep_one_service_with_zero_everywhere() -> None:
    services = services_of("replicas_zero")
    assert services["standby"]["deploy"] == {"replicas": 0}
    assert services["standby-netns"]["deploy"] == {"replicas": 0}
    assert services["standby-proxy"]["deploy"] == {"replicas": 0}
    assert "standby-2" not in services
    assert "deploy" not in services["active-netns"]


@pytest.mark.parametrize(
    ("case", "service", "mode"),
    [
        ("network_mode_host", "node-exporter", "host"),
        ("network_mode_none", "batch", "none"),
        ("network_mode_container", "probe", "container:abc123"),
    ],
)
def test_own_namespace_modes_are_left_out(case: str, service: str, mode: str) -> None:
    result = injected(case)
    services = result.model["services"]
    assert services[service] == loaded(case).model["services"][service]
    assert f"{service}-netns" not in services and f"{service}-proxy" not in services
    assert [w for w in result.warnings if w.startswith(f"service {service!r}")] == [
        w for w in result.warnings if f"network_mode {mode}: left out of the mesh" in w
    ]
    assert any(f"network_mode {mode}: left out of the mesh" in w for w in result.warnings)
    assert "web-netns" in services  # the others are still meshed


def test_host_mode_warning_text() -> None:
    assert injected("network_mode_host").warnings == (
        "service 'node-exporter': network_mode host: left out of the mesh "
        "(a sidecar needs the service's own network namespace)",
    )


def test_service_mode_joins_the_meshed_namespace() -> None:
    result = injected("network_mode_service_meshed")
    services = result.model["services"]
    for joiner in ("debug", "nested"):
        assert services[joiner]["network_mode"] == "service:app-netns"
        assert services[joiner]["depends_on"]["app-proxy"]["condition"] == "service_healthy"
        assert f"{joiner}-netns" not in services and f"{joiner}-proxy" not in services
        assert any(w.startswith(f"service {joiner!r}: network_mode service:") for w in
                   result.warnings)
    assert [r.proxy for r in result.services if r.service == "debug"] == ["app-proxy"]


def test_chained_service_modes_resolve_to_the_first_owner() -> None:
    services = services_of("chained_network_mode")
    assert services["helper"]["network_mode"] == "service:core-netns"
    assert services["helper-of-helper"]["network_mode"] == "service:core-netns"
    assert set(services["core-netns"]["networks"]) == {"default", "extra"}


def test_service_mode_on_an_unmeshed_service_is_left_out() -> None:
    result = injected("network_mode_service_unmeshed")
    services = result.model["services"]
    assert services["torrent"] == loaded("network_mode_service_unmeshed").model["services"][
        "torrent"
    ]
    assert services["vpn"] == loaded("network_mode_service_unmeshed").model["services"]["vpn"]
    assert result.warnings == (
        "service 'torrent': network_mode service:vpn: left out of the mesh "
        "(service 'vpn' is not in the mesh)",
    )


def test_bridge_mode_moves_to_the_holder_with_a_warning() -> None:
    result = injected("network_mode_bridge")
    services = result.model["services"]
    assert services["legacy-netns"]["network_mode"] == "bridge"
    assert "networks" not in services["legacy-netns"]
    assert services["legacy-netns"]["ports"][0]["published"] == "8088"
    assert services["legacy"]["network_mode"] == "service:legacy-netns"
    assert any("network aliases do not work" in w and "'legacy'" in w for w in result.warnings)
    assert services[wk.PILOT_SERVICE]["networks"] == {"default": None}


def test_disabled_services_are_untouched() -> None:
    result = injected("disabled")
    services = result.model["services"]
    before = loaded("disabled").model["services"]
    assert services["db"] == before["db"]
    assert services["cache"] == before["cache"]
    assert "db-netns" not in services and "cache-proxy" not in services
    assert {r.service: r.netns for r in result.services} == {
        "web": "web-netns", "db": None, "cache": None,
    }


def test_user_aliases_are_kept_beside_the_mesh_names() -> None:
    services = services_of("versions_weights")
    assert services["checkout-v2-netns"]["networks"]["default"]["aliases"] == [
        "checkout-canary", "checkout-v2", "checkout",
    ]
    assert services["cart-netns"]["networks"]["default"]["aliases"] == ["cart", "checkout-cart"]
    assert labels_of(services["checkout-v1-proxy"])[wk.LABEL_VERSION] == "v1"


def test_extension_fields_survive() -> None:
    before = loaded("anchors_merge").model
    services = services_of("anchors_merge")
    assert injected("anchors_merge").model["x-common"] == before["x-common"]
    # compose's model keeps top-level x- fields only; a service's own have no effect on it
    assert "x-team" not in services["two"]
    assert services["two"]["environment"] == {"LOG_LEVEL": "info", "EXTRA": "yes"}
    assert services["one"]["logging"]["options"]["max-size"] == "10m"


def test_net_sysctls_split_from_the_others() -> None:
    services = services_of("sysctls")
    assert services["listed-netns"]["sysctls"] == {
        "net.core.somaxconn": "1024", "net.ipv4.tcp_syncookies": "0",
    }
    assert services["listed"]["sysctls"] == {"kernel.msgmax": "65536"}
    assert list(services["mapped-netns"]["sysctls"]) == ["net.ipv4.ip_local_port_range"]
    assert list(services["mapped"]["sysctls"]) == ["kernel.shmmax"]
    assert "sysctls" not in services["only_net"]
    assert "sysctls" in services["only_net-netns"]


def test_links_point_at_the_holder() -> None:
    services = services_of("links")
    holder = services["web-netns"]
    assert holder["links"] == ["db-netns:db", "cache:redis"]  # cache is not meshed
    assert holder["external_links"] == ["some_other_project_db_1:legacy-db"]
    assert holder["depends_on"]["db-netns"]["condition"] == "service_started"
    assert "links" not in services["web"]


def test_extends_is_resolved_before_injection() -> None:
    services = services_of("extends")
    assert as_map(services["derived"]["environment"]) == {"ROLE": "derived"}
    assert labels_of(services["derived-netns"])[wk.LABEL_VERSION] == "v2"
    assert labels_of(services["derived-netns"])[wk.LABEL_SERVICE] == "base"
    assert services["derived-netns"]["ports"] == services["base-netns"]["ports"]


def test_settings_reach_the_pilot_as_json() -> None:
    model = injected("x_composemesh").model
    env = model["services"][wk.PILOT_SERVICE]["environment"]
    settings = json.loads(env["COMPOSEMESH_SETTINGS"])
    assert settings == loaded("x_composemesh").model["x-composemesh"]
    assert settings["trust_domain"] == "shop.example.com"
    # Resolved as compose resolves the file (CALLER unset here), `$` still written
    # `$$`: compose reads this copy at `up` exactly as it reads the x-composemesh section.
    assert settings["policies"]["reviews"][0]["from"] == ["legacy"]
    assert "$$5" in env["COMPOSEMESH_SETTINGS"]


def test_the_users_root_is_mounted_read_only_into_the_pilot() -> None:
    pilot = injected("user_root").model["services"][wk.PILOT_SERVICE]
    certs = CASES_DIR.resolve() / "certs"
    assert [v["source"] for v in pilot["volumes"][:3]] == [
        "/var/run/docker.sock", PILOT_VOLUME, SOCKET_VOLUME]
    assert pilot["volumes"][3:] == [
        {"type": "bind", "source": str(certs / "root.pem"), "target": PILOT_ROOT_CERT,
         "read_only": True},
        {"type": "bind", "source": str(certs / "root-key.pem"), "target": PILOT_ROOT_KEY,
         "read_only": True},
    ]
    assert PILOT_ROOT_CERT == "/etc/composemesh/ca/root.pem"
    assert PILOT_ROOT_KEY == "/etc/composemesh/ca/root-key.pem"
    env = pilot["environment"]
    assert env["COMPOSEMESH_CA_CERT_FILE"] == PILOT_ROOT_CERT
    assert env["COMPOSEMESH_CA_KEY_FILE"] == PILOT_ROOT_KEY
    assert json.loads(env["COMPOSEMESH_SETTINGS"])["mtls"]["root"]["cert"] == "certs/root.pem"
    assert "ports" not in pilot


def test_root_mounts_follow_the_given_ca_config_and_survive_reinjection() -> None:
    model: dict[str, Any] = {
        "services": {"web": {"image": "busybox"}},
        "x-composemesh": {"mtls": {"root": {"cert": "pki/ca.pem", "key": "/keys/ca-key.pem"}}},
    }
    ca = parse_ca_config(model["x-composemesh"]["mtls"], "/srv/shop")
    once = inject(model, ca=ca).model
    pilot = once["services"][wk.PILOT_SERVICE]
    mounts = {v["target"]: v["source"] for v in pilot["volumes"] if v.get("read_only")}
    assert mounts == {PILOT_ROOT_CERT: "/srv/shop/pki/ca.pem", PILOT_ROOT_KEY: "/keys/ca-key.pem"}
    assert inject(once).model == once  # a meshed file keeps its pilot's root
    assert inject(once, ca=ca).model == once
    # a CA config without a root (the user took it out) is the word: no mounts, no env
    plain = inject(once, ca=CAConfig()).model["services"][wk.PILOT_SERVICE]
    assert not any(v.get("read_only") for v in plain["volumes"])
    assert "COMPOSEMESH_CA_CERT_FILE" not in plain["environment"]
    untouched = inject({"services": {"web": {"image": "busybox"}}}).model
    assert "environment" not in untouched["services"][wk.PILOT_SERVICE]


def test_an_injected_file_loaded_again_comes_back_unchanged() -> None:
    model = loaded("already_meshed").model
    result = inject(model)
    assert result.model == model
    assert set(result.warnings) == {
        "service 'sidecar': network_mode service:api-netns: shares the network namespace "
        "and the proxy of meshed service 'api' (no sidecar of its own)",
        "service 'metrics': network_mode host: left out of the mesh "
        "(a sidecar needs the service's own network namespace)",
    }
    assert {a.name for a in result.added} == {
        "front-netns", "front-proxy", "api-netns", "api-proxy",
        "api-2-netns", "api-2-proxy", wk.PILOT_SERVICE,
    }


def test_a_service_added_to_a_meshed_file_is_injected() -> None:
    before = loaded("meshed_plus_new").model
    services = services_of("meshed_plus_new")
    assert services["late"]["network_mode"] == "service:late-netns"
    assert services["late-netns"]["ports"] == before["services"]["late"]["ports"]
    assert set(services["late"]["depends_on"]) >= {"api", "api-2"}
    old = loaded("already_meshed").model["services"]
    for name, svc in old.items():
        assert services[name] == svc, name


def test_multi_file_projects_merge_before_injection() -> None:
    services = services_of("override")
    published = {p["published"] for p in services["web-netns"]["ports"]}
    assert published == {"8080", "8443"}
    assert labels_of(services["web-netns"])[wk.LABEL_VERSION] == "v2"


def test_deploy_keeps_everything_but_replicas() -> None:
    services = services_of("deploy_other")
    for inst in ("api", "api-2"):
        deploy = services[inst]["deploy"]
        assert "replicas" not in deploy
        assert deploy["restart_policy"] == {"condition": "on-failure"}
        assert services[inst]["cap_add"] == ["SYS_PTRACE"]
        assert services[inst]["user"] == "1000:1000"


def test_container_names_are_the_holders_aliases() -> None:
    """ELK's logstash calls "es", Supabase's Kong "realtime-dev.supabase-realtime": the
    name stays on the app's container (one container can have it), the holder answers to it
    on every network the app was on."""
    services = services_of("container_names")
    assert services["elasticsearch"]["container_name"] == "es"
    assert "container_name" not in services["elasticsearch-netns"]
    assert services["elasticsearch-netns"]["networks"] == {
        "elk": {"aliases": ["elasticsearch", "es"]}}
    assert services["logstash-netns"]["networks"]["elk"]["aliases"] == [
        "ingest", "logstash"]
    assert services["logstash-netns"]["links"] == ["elasticsearch-netns:search"]
    realtime = services["realtime-netns"]["networks"]
    for net in ("default", "elk"):
        assert realtime[net]["aliases"] == ["realtime", "realtime-dev.supabase-realtime"]


def test_holders_follow_the_apps_order_and_fixed_addresses_come_first() -> None:
    """awesome-compose's pihole + cloudflared: cloudflared's 172.20.0.2 is taken before
    pihole's holder and the pilot, which take theirs from the network, start."""
    result = injected("static_addresses")
    services = result.model["services"]
    pihole = services["pihole-netns"]["depends_on"]
    assert pihole["cloudflared-netns"] == {"condition": "service_started", "required": True}
    assert pihole["resolver-netns"] == {"condition": "service_started", "required": False}
    assert pihole["legacy"] == {"condition": "service_started", "required": False}
    assert "later-netns" not in pihole  # later waits for pihole, as its app asks
    assert services["later-netns"]["depends_on"] == {
        "pihole-netns": {"condition": "service_started", "required": True}}
    pilot = services[wk.PILOT_SERVICE]["depends_on"]
    assert set(pilot) == {"cloudflared-netns", "resolver-netns", "legacy", "later-netns"}
    assert all(dep == {"condition": "service_started", "required": False}
               for dep in pilot.values())
    for fixed in ("cloudflared-netns", "resolver-netns"):
        assert "depends_on" not in services[fixed], fixed  # nothing to wait for
    assert services["resolver-netns"]["networks"]["dns-net"]["ipv6_address"] == "fd00:20::3"
    assert result.warnings == (
        "service 'pihole': 'pihole-netns' starts before 'later-netns' (the apps' own order), "
        "so it could take the fixed address 'later-netns' asks for on network 'dns-net'; "
        "give it a fixed one too",
    )


def test_the_pilot_stays_off_external_networks() -> None:
    result = injected("external_only")
    services = result.model["services"]
    assert services[wk.PILOT_SERVICE]["networks"] == {"default": None}
    assert set(services["edge-netns"]["networks"]) == {"proxy"}  # the app's choice, kept
    assert result.warnings == (
        "service 'edge': on external networks only: the pilot joins none of them, so this "
        "proxy's metrics are not scraped (its traffic is meshed as usual)",
    )
    alone = injected("external_default").model["services"][wk.PILOT_SERVICE]
    assert alone["network_mode"] == "none" and "networks" not in alone


def test_holder_order_is_derived_again_on_every_injection() -> None:
    """A dependency the user took out of a meshed file leaves its holder too."""
    once = injected("static_addresses").model
    edited = copy.deepcopy(once)
    del edited["services"]["pihole"]["depends_on"]["cloudflared"]
    edited["services"]["cloudflared-netns"]["networks"]["dns-net"].pop("ipv4_address")
    again = inject(edited).model["services"]
    assert "cloudflared-netns" not in again["pihole-netns"]["depends_on"]
    assert "cloudflared-netns" not in again[wk.PILOT_SERVICE]["depends_on"]


def test_the_plan_says_udp_is_not_captured() -> None:
    """UDP passes the mesh uncaptured: the plan says so for each app that publishes or
    exposes a UDP port (a note, as Istio and Consul document it), and for no other."""
    def notes(case: str) -> dict[str, tuple[str, ...]]:
        return {row.service: row.notes for row in injected(case).services}

    gateway = [n for n in notes("ports")["gateway"] if n.startswith("UDP")]
    assert gateway == ["UDP 53/udp, 7200/udp not captured: it passes the mesh as it is "
                       "(plaintext, no policy, no metrics), as with Istio and Consul"]
    assert any(n.startswith("UDP 9000/udp not captured") for n in notes("expose")["backend"])
    assert not any(n.startswith("UDP") for row in notes("bookinfo").values() for n in row)
    model = {"services": {"dns": {"image": "x", "ports": ["53:53/udp", "8080:80"]}}}
    row = inject(model).services[0]
    assert row.notes == ("UDP 53/udp not captured: it passes the mesh as it is (plaintext, "
                         "no policy, no metrics), as with Istio and Consul",)


# --------------------------------------------------------------------------- pure shapes


def test_custom_image_and_raw_short_syntax() -> None:
    model = {
        "services": {
            "w": {
                "image": "x",
                "deploy": {"replicas": 2},
                "ports": ["8080:80", "127.0.0.1::81", "[::1]:9000:9000/udp", 82, "8000-8001:83"],
                "networks": ["a", "b"],
            }
        },
        "networks": {"a": None, "b": None},
    }
    result = inject(model, image="registry.local/mesh:dev")
    services = result.model["services"]
    assert {s["image"] for n, s in services.items() if n != "w" and n != "w-2"} == {
        "registry.local/mesh:dev"
    }
    assert services["w-2-netns"]["ports"] == ["127.0.0.1::81", 82, "8000-8001:83"]
    assert services["w-netns"]["networks"] == {
        "a": {"aliases": ["w"]}, "b": {"aliases": ["w"]},
    }
    assert services["w-2-netns"]["networks"]["a"] == {"aliases": ["w-2", "w"]}
    assert any("8080:80" in w and "[::1]:9000:9000/udp" in w for w in result.warnings)


def test_labels_are_parsed_when_not_given() -> None:
    model = {"services": {"a": {"image": "x", "labels": {"composemesh.enable": "false"}}}}
    result = inject(model)
    assert result.model == {"services": {"a": {"image": "x", "labels": {
        "composemesh.enable": "false"}}}}
    assert result.warnings == ("no service is in the mesh: nothing was injected",)
    assert result.added == ()


def test_given_labels_take_precedence() -> None:
    model = {"services": {"a": {"image": "x"}}}
    labels = {"a": parse_labels({"composemesh.version": "v9"}, compose_service="a")}
    services = inject(model, labels).model["services"]
    assert labels_of(services["a-netns"])[wk.LABEL_VERSION] == "v9"


def test_a_user_service_with_an_injected_name_is_refused() -> None:
    model = {"services": {"web": {"image": "x"}, "web-proxy": {"image": "y"}}}
    with pytest.raises(ConfigError) as info:
        inject(model)
    assert "'web-proxy'" in str(info.value) and "'web'" in str(info.value)


def test_foreign_roles_are_kept_and_orphans_dropped() -> None:
    model = {
        "services": {
            "gw": {"image": "g", "labels": {wk.LABEL_ROLE: "gateway"}},
            "gone-netns": {"image": "m", "labels": {wk.LABEL_ROLE: wk.ROLE_NETNS,
                                                     wk.LABEL_OF: "gone"}},
            "gone-proxy": {"image": "m", "labels": {wk.LABEL_ROLE: wk.ROLE_PROXY,
                                                     wk.LABEL_OF: "gone"}},
            "web": {"image": "x"},
        }
    }
    result = inject(model)
    services = result.model["services"]
    assert services["gw"] == model["services"]["gw"]
    assert "gone-netns" not in services and "gone-proxy" not in services
    assert "web-netns" in services
    assert (
        "service 'gone-netns': injected earlier, dropped now: its app 'gone' is gone or out "
        "of the mesh"
    ) in result.warnings


def test_non_numeric_replicas_are_not_expanded() -> None:
    model = {"services": {"w": {"image": "x", "deploy": {"replicas": "${N}"}}}}
    result = inject(model)
    assert "w-2" not in result.model["services"]
    assert result.model["services"]["w"]["deploy"] == {"replicas": "${N}"}
    assert any("'${N}' is not a number" in w for w in result.warnings)


def test_added_lists_every_injected_service() -> None:
    result = injected("bookinfo")
    roles = {a.name: (a.role, a.of) for a in result.added}
    assert roles["ratings-netns"] == (wk.ROLE_NETNS, "ratings")
    assert roles["ratings-proxy"] == (wk.ROLE_PROXY, "ratings")
    assert roles[wk.PILOT_SERVICE] == (wk.ROLE_PILOT, None)
    assert len(roles) == 2 * 6 + 1


def test_proxy_limit_labels_reach_the_proxy_and_bad_ones_are_one_error() -> None:
    from composemesh.model.limits import limits_from_env

    model = {"services": {"web": {"image": "demo", "labels": {
        "composemesh.proxy.request_headers_timeout": "2s",
        "composemesh.proxy.max_request_headers_kb": "8"}}}}
    env = inject(model).model["services"]["web-proxy"]["environment"]
    limits = limits_from_env(env)
    assert (limits.request_headers_timeout, limits.max_request_head) == (2.0, 8 * 1024)
    plain = inject({"services": {"web": {"image": "demo"}}}).model["services"]["web-proxy"]
    assert "COMPOSEMESH_LIMITS" not in plain["environment"]
    bad = {"services": {"web": {"image": "demo", "labels": {
        "composemesh.proxy.request_headers_timeout": "soon"}}}}
    with pytest.raises(ConfigError) as err:
        inject(bad)
    assert "composemesh.proxy.request_headers_timeout" in str(err.value)
    assert "web" in str(err.value)
