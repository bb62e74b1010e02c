"""Compose syntax, read and written the way compose does: ports, depends_on, networks and
their aliases, sysctls, links, start order. Pure, and nothing here reads the mesh's labels.

Helpers that change a service change the dict they are given (the injector works on its own
deep copy); the others only read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from composemesh.errors import ConfigError

# Keys of a service that belong to its network namespace: Docker refuses them on a container
# that joins another's namespace, so they move to the holder. (net.* sysctls move too.)
NETNS_KEYS = (
    "ports",
    "expose",
    "networks",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
    "links",
    "external_links",
)


def services_of(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``services`` of a compose model (itself, not a copy), each checked to be a mapping."""
    services = model.get("services") or {}
    if not isinstance(services, dict):
        raise ConfigError("must be a mapping of service names to services", field="services")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            raise ConfigError("must be a mapping", service=name)
    return services


def take_netns(app: dict[str, Any]) -> dict[str, Any]:
    """Remove from ``app`` (and return) what belongs to its network namespace."""
    ns = {key: app.pop(key) for key in NETNS_KEYS if key in app}
    mode = app.pop("network_mode", None)
    if mode is not None:
        ns["network_mode"] = mode
    if "sysctls" in app:
        net, rest = split_sysctls(app["sysctls"])
        if net is not None:
            ns["sysctls"] = net
            if rest is None:
                del app["sysctls"]
            else:
                app["sysctls"] = rest
    return ns


def split_sysctls(value: Any) -> tuple[Any, Any]:
    """(net.* sysctls, the others), each in the form they came in, None if empty."""
    if isinstance(value, Mapping):
        net_map = {k: v for k, v in value.items() if str(k).strip().startswith("net.")}
        rest_map = {k: v for k, v in value.items() if k not in net_map}
        return (net_map or None), (rest_map or None)
    if isinstance(value, list):
        net = [s for s in value if str(s).partition("=")[0].strip().startswith("net.")]
        rest = [s for s in value if s not in net]
        return (net or None), (rest or None)
    return None, value


def fixed_host_port(port: Any) -> bool:
    """Whether a ports entry (long or short syntax) publishes one fixed host port."""
    if isinstance(port, Mapping):
        published = port.get("published")
        text = "" if published is None else str(published).strip()
    elif isinstance(port, int):
        return False
    else:
        spec = str(port).rpartition("/")[0] or str(port)
        if spec.startswith("["):  # [ipv6]:host:container
            spec = spec[spec.index("]") + 1 :].lstrip(":")
            parts = spec.split(":")
            text = parts[0] if len(parts) == 2 else ""
        else:
            parts = spec.split(":")
            text = parts[-2] if len(parts) >= 2 else ""
    return bool(text) and "-" not in text and text != "0"


def udp_ports(holder: Mapping[str, Any]) -> list[str]:
    """The UDP ports a holder publishes or exposes, as ``<container port>/udp``."""
    found = []
    for port in holder.get("ports") or ():
        if isinstance(port, Mapping):
            if str(port.get("protocol", "tcp")).lower() == "udp":
                found.append(f"{port.get('target')}/udp")
        elif str(port).lower().endswith("/udp"):
            found.append(f"{str(port)[:-4].rpartition(':')[2]}/udp")
    for port in holder.get("expose") or ():
        if str(port).lower().endswith("/udp"):
            found.append(str(port).lower())
    return list(dict.fromkeys(found))


def port_text(port: Any) -> str:
    """A ports entry as its short syntax (long syntax: ``[host_ip:]published:target/proto``)."""
    if not isinstance(port, Mapping):
        return str(port)
    host = f"{port['host_ip']}:" if port.get("host_ip") else ""
    return f"{host}{port.get('published', '')}:{port.get('target')}/{port.get('protocol', 'tcp')}"


def dependency(condition: str, *, restart: bool = False) -> dict[str, Any]:
    """One ``depends_on`` entry in long syntax, as compose writes it."""
    dep: dict[str, Any] = {"condition": condition, "required": True}
    if restart:
        dep["restart"] = True
    return dep


def depends_on_mapping(svc: dict[str, Any]) -> dict[str, Any]:
    """``depends_on`` of ``svc`` as a mapping (a list becomes service_started entries)."""
    deps = svc.get("depends_on")
    if isinstance(deps, Mapping):
        mapping = dict(deps)
    else:
        mapping = {str(d): dependency("service_started") for d in deps or ()}
    svc["depends_on"] = mapping
    return mapping


def with_aliases(networks: Any, aliases: Iterable[str]) -> dict[str, Any]:
    """``networks`` as a mapping, each entry's aliases extended with ``aliases``."""
    if isinstance(networks, Mapping):
        entries = dict(networks)
    else:
        entries = {str(n): None for n in networks or ()}
    out: dict[str, Any] = {}
    for net, spec in entries.items():
        spec = dict(spec) if isinstance(spec, Mapping) else {}
        current = list(spec.get("aliases") or [])
        for alias in aliases:
            if alias not in current:
                current.append(alias)
        spec["aliases"] = current
        out[net] = spec
    return out


def rewrite_links(services: dict[str, Any], targets: Mapping[str, str]) -> None:
    """``links: [T]`` to a meshed T becomes ``T-netns:T``: the holder owns T's endpoint.

    A link implies a dependency; it is written out as compose itself would.
    """
    for svc in services.values():
        links = svc.get("links")
        if not isinstance(links, list):
            continue
        rewritten = []
        for link in links:
            target, _, alias = str(link).partition(":")
            if target in targets:
                target = targets[target]
                link = f"{target}:{alias or link}"
            rewritten.append(link)
            if target in services:
                deps = depends_on_mapping(svc)
                if target not in deps:
                    deps[target] = dependency("service_started", restart=True)
        svc["links"] = rewritten


def external_networks(networks: Any) -> frozenset[str]:
    """The keys of the top-level networks that the project does not own (``external``)."""
    if not isinstance(networks, Mapping):
        return frozenset()
    return frozenset(
        str(key) for key, spec in networks.items()
        if isinstance(spec, Mapping) and spec.get("external") in (True, "true", "True")
    )


def attached_networks(svc: Mapping[str, Any]) -> list[str]:
    """The networks ``svc`` is attached to by name: none when it has a ``network_mode``."""
    if "network_mode" in svc:
        return []
    return [str(n) for n in svc.get("networks") or {}]


def static_networks(svc: Mapping[str, Any]) -> set[str]:
    """The networks on which ``svc`` asks for a fixed address."""
    nets = svc.get("networks") if "network_mode" not in svc else None
    if not isinstance(nets, Mapping):
        return set()
    return {
        str(net) for net, spec in nets.items()
        if isinstance(spec, Mapping) and (spec.get("ipv4_address") or spec.get("ipv6_address"))
    }


def start_edges(svc: Mapping[str, Any]) -> set[str]:
    """The services compose starts before ``svc``: depends_on, links, network_mode service:,
    volumes_from."""
    edges = {str(d) for d in svc.get("depends_on") or ()}
    edges.update(str(link).partition(":")[0] for link in svc.get("links") or ())
    mode = str(svc.get("network_mode") or "")
    if mode.startswith("service:"):
        edges.add(mode.removeprefix("service:"))
    for source in svc.get("volumes_from") or ():
        text = str(source)
        if not text.startswith("container:"):
            edges.add(text.partition(":")[0])
    return edges


def starts_before(services: Mapping[str, Any], first: str, then: str) -> bool:
    """Whether compose must start ``first`` before ``then`` (a path of start edges)."""
    seen, todo = set(), [then]
    while todo:
        name = todo.pop()
        if name == first:
            return True
        if name in seen or not isinstance(services.get(name), Mapping):
            continue
        seen.add(name)
        todo.extend(start_edges(services[name]))
    return False
