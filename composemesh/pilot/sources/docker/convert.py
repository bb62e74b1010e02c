"""Pure translation of the Docker engine's container listing into mesh Workloads.

Docker's JSON stops here: nothing past `workloads_from_containers` sees an engine type.
A container that cannot be understood is skipped with a reason, never fatal to the others.
Its ``composemesh.*`` labels are read by the CLI's own decoder (``model.labels``); a label
that does not decode is logged and its default used, the container meshed all the same.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from composemesh.model import wellknown as wk
from composemesh.model.labels import LabelError, MeshLabels, decode_labels
from composemesh.model.mesh import NetworkAttachment, Workload

log = logging.getLogger("composemesh.pilot.docker")

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def container_name(container: Mapping[str, Any]) -> str:
    names = container.get("Names") or [container.get("Id", "?")[:12]]
    return str(names[0]).lstrip("/")


def addresses(container: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(ip for _, ip in networks(container)))


def networks(container: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(network name, address) of each network the container is on, sorted by name."""
    nets = ((container.get("NetworkSettings") or {}).get("Networks")) or {}
    found = [
        (str(name), str(n["IPAddress"])) for name, n in nets.items() if n and n.get("IPAddress")
    ]
    return tuple(sorted(found))


def attachments(container: Mapping[str, Any]) -> tuple[NetworkAttachment, ...]:
    """Each network the container has an address on, with its subnet and gateway, by name.

    A network whose address or prefix length the engine does not give (or gives malformed)
    is left out: it cannot be told apart from the outside world by its subnet.
    """
    nets = ((container.get("NetworkSettings") or {}).get("Networks")) or {}
    found = []
    for name, n in nets.items():
        if not n or not n.get("IPAddress"):
            continue
        try:
            subnet = ipaddress.ip_interface(f"{n['IPAddress']}/{n.get('IPPrefixLen')}").network
        except ValueError:
            continue
        gateway = str(n.get("Gateway") or "")
        found.append(NetworkAttachment(str(name), str(n["IPAddress"]), str(subnet), gateway))
    return tuple(sorted(found, key=lambda a: a.name))


def published_ports(container: Mapping[str, Any]) -> tuple[int, ...]:
    """The container's TCP ports published on the host (``PrivatePort`` of each with a
    ``PublicPort``), sorted, each once (an IPv4 and an IPv6 binding are one port)."""
    ports = {
        int(p["PrivatePort"])
        for p in container.get("Ports") or []
        if p.get("PublicPort") and p.get("PrivatePort") and p.get("Type", "tcp") == "tcp"
    }
    return tuple(sorted(ports))


def log_label_problems(container: str, problems: tuple[LabelError, ...]) -> None:
    """One warning per container for all of its labels that did not decode."""
    log.warning("container %s: %s (their defaults are used)", container,
                "; ".join(str(p) for p in problems))


def holder_labels(
    holder: Mapping[str, Any],
    on_label_problems: Callable[[str, tuple[LabelError, ...]], None] = log_label_problems,
) -> MeshLabels:
    """The mesh labels of a netns holder (which carries ``composemesh.of``), decoded as the
    CLI decodes them; what did not decode is handed to ``on_label_problems`` and defaulted."""
    labels = holder.get("Labels") or {}
    decoded, problems = decode_labels(labels, compose_service=labels[wk.LABEL_OF])
    if problems:
        on_label_problems(container_name(holder), problems)
    return decoded


def workloads_from_containers(
    containers: Iterable[Mapping[str, Any]],
    *,
    project: str,
    on_label_problems: Callable[[str, tuple[LabelError, ...]], None] = log_label_problems,
) -> tuple[tuple[Workload, ...], tuple[str, ...]]:
    """Workloads of ``project`` (one per netns holder) and the reasons for what was skipped.

    A holder's labels that do not decode go to ``on_label_problems`` (by default: one
    warning per holder), once per call.

    A proxy belongs to the holder whose namespace it joined (``HostConfig.NetworkMode`` is
    ``container:<holder id>``), so scaled or recreated containers pair up correctly.
    """
    holders: dict[str, Mapping[str, Any]] = {}
    proxies: dict[str, Mapping[str, Any]] = {}
    apps: dict[str, list[Mapping[str, Any]]] = {}
    skipped: list[str] = []
    for container in containers:
        labels = container.get("Labels") or {}
        if labels.get(PROJECT_LABEL) != project:
            continue
        role = labels.get(wk.LABEL_ROLE)
        of = labels.get(wk.LABEL_OF)
        if role is None:
            mode = str((container.get("HostConfig") or {}).get("NetworkMode", ""))
            if mode.startswith("container:"):
                apps.setdefault(mode.removeprefix("container:"), []).append(container)
            continue
        if role not in (wk.ROLE_NETNS, wk.ROLE_PROXY):
            continue
        if not of:
            skipped.append(f"{container_name(container)}: label {wk.LABEL_OF} missing")
            continue
        if role == wk.ROLE_NETNS:
            holders[str(container.get("Id"))] = container
        else:
            mode = str((container.get("HostConfig") or {}).get("NetworkMode", ""))
            proxies[mode.removeprefix("container:")] = container

    workloads = []
    for holder_id, holder in sorted(holders.items(), key=lambda kv: container_name(kv[1])):
        of = (holder.get("Labels") or {})[wk.LABEL_OF]
        mesh = holder_labels(holder, on_label_problems)
        proxy = proxies.get(holder_id)
        workloads.append(
            Workload(
                node=container_name(holder),
                project=project,
                compose_service=of,
                service=mesh.service,
                version=mesh.version,
                addresses=addresses(holder),
                # a gateway's namespace holds no app: its proxy is what serves
                running=holder.get("State") == "running" and (
                    bool((holder.get("Labels") or {}).get(wk.LABEL_GATEWAY))
                    or serving(apps.get(holder_id, []))),
                proxy_container=container_name(proxy) if proxy else None,
                proxy_container_id=str(proxy.get("Id")) if proxy else None,
                proxy_healthy=proxy is not None
                and proxy.get("State") == "running"
                and "(healthy)" in str(proxy.get("Status", "")),
                networks=networks(holder),
                weight=mesh.weight,
                protocol=mesh.protocol,
                port_protocols=tuple(sorted(mesh.port_protocols.items())),
                published_ports=published_ports(holder),
                attachments=attachments(holder),
            )
        )
    return tuple(workloads), tuple(skipped)


def serving(apps: list[Mapping[str, Any]]) -> bool:
    """The apps in a namespace can take traffic: all running, none unhealthy or starting.

    A namespace with no app container (yet) does not take traffic either.
    """
    return bool(apps) and all(
        a.get("State") == "running"
        and "(unhealthy)" not in str(a.get("Status", ""))
        and "(health: starting)" not in str(a.get("Status", ""))
        for a in apps
    )


def dependents_of(containers: Iterable[Mapping[str, Any]], holder_id: str) -> list[str]:
    """Ids of running containers that joined the network namespace of ``holder_id``."""
    mode = f"container:{holder_id}"
    return [
        str(c["Id"])
        for c in containers
        if str((c.get("HostConfig") or {}).get("NetworkMode", "")) == mode
        and c.get("State") == "running"
    ]


def is_stranded(dependent: Mapping[str, Any], holder: Mapping[str, Any]) -> bool:
    """A dependent that started before its holder's last start sits in a dead namespace.

    Both are ``docker inspect`` results; RFC 3339 timestamps of one engine compare as text
    once their fractional seconds are padded to the same width.
    """
    return _ts(dependent["State"]["StartedAt"]) < _ts(holder["State"]["StartedAt"])


def _ts(stamp: str) -> str:
    head, _, frac = stamp.rstrip("Z").partition(".")
    return f"{head}.{frac.ljust(9, '0')[:9]}"
