"""What each compose service is to the mesh: the classification the injector acts on.

Pure: a service is read from its compose keys (``network_mode``) and its labels, never
changed. The services the injector adds itself (holders, proxies, the pilot) are not
classified: the rewrite regenerates them beside their app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from composemesh.model import wellknown as wk
from composemesh.model.labels import MeshLabels, normalize_labels, parse_labels

# Roles of the services the injector adds and regenerates; other roles are left alone
# (ServiceKind.FOREIGN).
OWN_ROLES = (wk.ROLE_NETNS, wk.ROLE_PROXY, wk.ROLE_PILOT)


class ServiceKind(Enum):
    """What one user compose service is to the mesh, and so what the injector does with it."""

    OWNER = "owner"  # meshed now for the first time: it gets a netns holder and a proxy
    MESHED = "meshed"  # meshed before (in its own holder's namespace): both are regenerated
    JOINER = "joiner"  # network_mode service: into a meshed namespace: shares that proxy
    # its network_mode puts it where no proxy can be: host, none, container:, or the
    # namespace of a service that is not in the mesh
    LEFT_OUT = "left_out"
    DISABLED = "disabled"  # composemesh.enable=false
    FOREIGN = "foreign"  # carries a role label of someone else's: kept as it is


@dataclass(frozen=True)
class Classification:
    """How the injector treats one user service."""

    kind: ServiceKind
    holder: str | None = None  # joiner/meshed: the holder whose namespace it is in
    owner: str | None = None  # joiner/meshed: the app that holder serves
    note: str | None = None  # left_out: why (a warning); joiner: what (a warning)


def labels_of(svc: Mapping[str, Any], name: str) -> dict[str, str]:
    """The labels of compose service ``name`` as a mapping (a fresh dict)."""
    return normalize_labels(svc.get("labels"), service=name)


def role_of(svc: Any, name: str) -> str | None:
    """The mesh role label of ``svc`` (an injected service's), None for a user service."""
    if not isinstance(svc, Mapping):
        return None
    return labels_of(svc, name).get(wk.LABEL_ROLE)


def mesh_labels(
    services: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None
) -> dict[str, MeshLabels]:
    """The MeshLabels of every service: those in ``labels``, the others parsed here."""
    given = labels or {}
    return {
        name: given[name]
        if name in given
        else parse_labels(labels_of(svc, name), compose_service=name)
        for name, svc in services.items()
    }


def classify(
    services: Mapping[str, Any], mesh: Mapping[str, MeshLabels]
) -> dict[str, Classification]:
    """Classify every user (not injected) service: whether and how it joins the mesh."""
    roles = {name: role_of(svc, name) for name, svc in services.items()}
    out: dict[str, Classification] = {}

    def classify_one(name: str, seen: tuple[str, ...]) -> Classification:
        if name in out:
            return out[name]
        svc = services[name]
        mode = svc.get("network_mode")
        mode = None if mode is None else str(mode)
        target = mode[len("service:") :] if mode and mode.startswith("service:") else None
        if target is not None and roles.get(target) == wk.ROLE_NETNS:
            of = labels_of(services[target], target).get(wk.LABEL_OF, "")
            if of == name and target == wk.netns_service(name):
                return Classification(ServiceKind.MESHED, holder=target, owner=name)
            return Classification(
                ServiceKind.JOINER,
                holder=target,
                owner=of,
                note=f"network_mode {mode}: shares the network namespace and the proxy "
                f"of meshed service {of!r} (no sidecar of its own)",
            )
        if not mesh[name].enabled:
            return Classification(ServiceKind.DISABLED)
        if mode is None:
            return Classification(ServiceKind.OWNER)
        if mode in ("host", "none"):
            return Classification(
                ServiceKind.LEFT_OUT,
                note=f"network_mode {mode}: left out of the mesh "
                "(a sidecar needs the service's own network namespace)",
            )
        if mode.startswith("container:"):
            return Classification(
                ServiceKind.LEFT_OUT,
                note=f"network_mode {mode}: left out of the mesh "
                "(its namespace belongs to a container outside the project)",
            )
        if target is not None:
            base: Classification | None = None
            if target in services and roles.get(target) is None and target not in seen:
                base = classify_one(target, (*seen, name))
                out[target] = base
            if base is not None and base.kind in (ServiceKind.OWNER, ServiceKind.MESHED):
                return Classification(
                    ServiceKind.JOINER,
                    holder=wk.netns_service(target),
                    owner=target,
                    note=f"network_mode {mode}: shares the network namespace and the proxy "
                    f"of meshed service {target!r} (no sidecar of its own)",
                )
            if base is not None and base.kind is ServiceKind.JOINER:
                return Classification(
                    ServiceKind.JOINER,
                    holder=base.holder,
                    owner=base.owner,
                    note=f"network_mode {mode}: shares the network namespace and the proxy "
                    f"of meshed service {base.owner!r} (no sidecar of its own)",
                )
            return Classification(
                ServiceKind.LEFT_OUT,
                note=f"network_mode {mode}: left out of the mesh "
                f"(service {target!r} is not in the mesh)",
            )
        return Classification(ServiceKind.OWNER)

    for name in services:
        if roles[name] is None:
            out[name] = classify_one(name, ())
        elif roles[name] not in OWN_ROLES:
            out[name] = Classification(ServiceKind.FOREIGN)  # someone else's role: kept as it is
    return out
