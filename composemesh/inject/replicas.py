"""Replicas: a meshed service with ``scale``/``deploy.replicas`` N becomes N services, each
with its own netns holder and proxy (compose pairs ``network_mode: service:`` with the first
container of a service only), and the names the injector adds for them.

Pure: the helpers that change a service change the dict they are given (the injector's own
copy).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from composemesh.inject.classify import (
    OWN_ROLES,
    ServiceKind,
    classify,
    labels_of,
    mesh_labels,
    role_of,
)
from composemesh.inject.compose_syntax import depends_on_mapping, services_of
from composemesh.model import wellknown as wk
from composemesh.model.labels import MeshLabels


def replicas_of(svc: Mapping[str, Any]) -> int | str | None:
    """``scale`` or ``deploy.replicas``: an int, the raw text if not a number, None if unset."""
    value = svc.get("scale")
    if value is None:
        deploy = svc.get("deploy")
        value = deploy.get("replicas") if isinstance(deploy, Mapping) else None
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def instance_names(name: str, replicas: int | str | None) -> list[str]:
    """The services ``name`` becomes: itself alone unless ``replicas`` is a number above 1."""
    count = replicas if isinstance(replicas, int) and replicas > 1 else 1
    return [wk.instance_service(name, i) for i in range(1, count + 1)]


def make_instance(app: dict[str, Any], mesh_service: str, index: int) -> None:
    """Turn a copy of a replicated service into instance ``index`` of it."""
    app.pop("scale", None)
    deploy = app.get("deploy")
    if isinstance(deploy, dict):
        deploy.pop("replicas", None)
        if not deploy:
            del app["deploy"]
    labels = labels_of(app, "")
    labels[wk.LABEL_SERVICE] = mesh_service
    labels[wk.LABEL_INSTANCE] = str(index)
    app["labels"] = labels


_INSTANCE_SUFFIX = re.compile(r"^(.*)-(\d+)$")


def extend_instance_dependencies(services: dict[str, Any]) -> None:
    """Whoever depends on a replicated S depends on S-2..S-N too, with the same condition."""
    groups: dict[str, list[str]] = {}
    for name, svc in services.items():
        index = labels_of(svc, name).get(wk.LABEL_INSTANCE, "")
        if not index.isdigit() or role_of(svc, name) is not None:
            continue
        if int(index) == 1:
            groups.setdefault(name, []).insert(0, name)
        else:
            m = _INSTANCE_SUFFIX.match(name)
            if m and m.group(2) == index:
                groups.setdefault(m.group(1), []).append(name)
    groups = {base: members for base, members in groups.items() if len(members) > 1}
    if not groups:
        return
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if not deps:
            continue
        hits = [base for base in groups if base in deps and name not in groups[base]]
        if not hits:
            continue
        mapping = depends_on_mapping(svc)
        for base in hits:
            for member in groups[base]:
                if member not in mapping:
                    mapping[member] = copy.deepcopy(mapping[base])


def injected_names(
    model: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None = None
) -> dict[str, str]:
    """Every service name the injector would add, each with a phrase saying what it is for.

    Only services it would newly create count: an injected model yields nothing new.
    """
    services = services_of(model)
    mesh = mesh_labels(services, labels)
    classified = classify(services, mesh)
    names: dict[str, str] = {}
    for name, what in classified.items():
        if what.kind is not ServiceKind.OWNER:
            continue
        instances = instance_names(name, replicas_of(services[name]))
        for index, inst in enumerate(instances, start=1):
            if index > 1:
                names[inst] = f"instance {index} of replicated service {name!r}"
            names[wk.netns_service(inst)] = f"network namespace holder of service {inst!r}"
            names[wk.proxy_service(inst)] = f"proxy of service {inst!r}"
    if any(c.kind in (ServiceKind.OWNER, ServiceKind.MESHED) for c in classified.values()):
        names[wk.PILOT_SERVICE] = "mesh's pilot"
    return names


def collisions(
    model: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None = None
) -> list[tuple[str, str]]:
    """User services whose name the injector needs: (name, what the injector adds there)."""
    services = services_of(model)
    return [
        (name, what)
        for name, what in injected_names(model, labels).items()
        if name in services and role_of(services[name], name) not in OWN_ROLES
    ]
