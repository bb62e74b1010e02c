"""Consul's JSON to the mesh's values and back: pure functions, the one place its shapes are known.

What composemesh registers for one mesh service instance (``registration``)::

    {"ID": "<project>-<compose service>-<n>@<host address>", "Name": "<mesh service>",
     "Tags": ["<version>"], "Address": "<host address>", "Port": <east-west port>,
     "Meta": {"version": ..., "spiffe": ..., "project": ..., "composemesh": "1"},
     "Check": {"CheckID": "service:<ID>", "TTL": "30s", "DeregisterCriticalServiceAfter": "1m",
               "Status": "passing" | "critical", ...}}

The address and port are the east-west gateway's: that is where other hosts reach every instance
of this host. The ID holds the host address because several hosts may run a project of the same
name against one Consul agent; it is stable across pilot restarts, so a re-registration replaces.
A pilot that vanishes stops passing the TTL: 30s later the instance is critical (out of
``passing`` answers), a minute after that Consul removes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from composemesh.model.consul import CatalogInstance, ConsulSettings, ExportedInstance

META_VERSION = "version"
META_SPIFFE = "spiffe"
META_PROJECT = "project"
META_MARK = "composemesh"  # "1" on every registration composemesh makes
MARK = "1"
CHECK_TTL = "30s"
CHECK_TTL_SECONDS = 30.0  # the pilot passes the check well within this (every 10s, say)
DEREGISTER_CRITICAL_AFTER = "1m"  # Consul's minimum


def service_id(instance: ExportedInstance, host_address: str) -> str:
    """The instance's ID in Consul: the same for the same container on the same host."""
    return f"{instance.project}-{instance.compose_service}-{instance.instance}@{host_address}"


def check_id(service_id: str) -> str:
    """The ID of the TTL check of the registration ``service_id``."""
    return f"service:{service_id}"


def registration(instance: ExportedInstance, settings: ConsulSettings) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for ``instance`` of this host."""
    sid = service_id(instance, settings.host_address)
    return {
        "ID": sid,
        "Name": instance.service,
        "Tags": [instance.version],
        "Address": settings.host_address,
        "Port": settings.east_west_port,
        "Meta": {
            META_VERSION: instance.version,
            META_SPIFFE: instance.spiffe,
            META_PROJECT: instance.project,
            META_MARK: MARK,
        },
        "Check": {
            "CheckID": check_id(sid),
            "Name": f"composemesh pilot of {instance.project}: "
                    f"{instance.compose_service} #{instance.instance}",
            "TTL": CHECK_TTL,
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
            "Status": "passing" if instance.healthy else "critical",
        },
    }


def service_names(body: object) -> tuple[str, ...]:
    """``GET /v1/catalog/services`` (name -> tags) to the names, sorted; ValueError if not it."""
    if not isinstance(body, Mapping):
        raise ValueError(f"the list of services is a JSON {_kind(body)}, not an object")
    return tuple(sorted(str(name) for name in body))


def health_instances(body: object) -> tuple[tuple[CatalogInstance, ...], tuple[str, ...]]:
    """``GET /v1/health/service/:name`` to its instances, and why any entry was left out.

    An entry that is not as documented is skipped (and said why), never fatal to the others;
    a body that is not a list at all is a ValueError.
    """
    if not isinstance(body, list):
        raise ValueError(f"the service's health is a JSON {_kind(body)}, not an array")
    kept: list[CatalogInstance] = []
    problems: list[str] = []
    for i, entry in enumerate(body):
        try:
            kept.append(health_instance(entry))
        except ValueError as err:
            problems.append(f"entry {i}: {err}")
    return tuple(kept), tuple(problems)


def health_instance(entry: object) -> CatalogInstance:
    """One entry of ``GET /v1/health/service/:name``; ValueError naming the field if malformed."""
    entry = _object(entry, "the entry")
    node = _object(entry.get("Node"), "Node")
    service = _object(entry.get("Service"), "Service")
    meta = _meta(service.get("Meta"), "Service.Meta")
    return CatalogInstance(
        service=_string(service.get("Service"), "Service.Service", empty=False),
        id=_string(service.get("ID"), "Service.ID", empty=False),
        node=_string(node.get("Node"), "Node.Node", empty=False),
        # "if empty, node address should be used" (api-docs/catalog)
        address=_string(service.get("Address"), "Service.Address")
        or _string(node.get("Address"), "Node.Address", empty=False),
        port=_port(service.get("Port"), "Service.Port"),
        tags=_tags(service.get("Tags"), "Service.Tags"),
        version=meta.get(META_VERSION),
        spiffe=meta.get(META_SPIFFE),
        datacenter=_string(node.get("Datacenter"), "Node.Datacenter") or None,
        project=meta.get(META_PROJECT) if meta.get(META_MARK) == MARK else None,
    )


def catalog_instance(entry: object) -> CatalogInstance:
    """One entry of ``GET /v1/catalog/service/:name``; ValueError naming the field if malformed."""
    entry = _object(entry, "the entry")
    meta = _meta(entry.get("ServiceMeta"), "ServiceMeta")
    return CatalogInstance(
        service=_string(entry.get("ServiceName"), "ServiceName", empty=False),
        id=_string(entry.get("ServiceID"), "ServiceID", empty=False),
        node=_string(entry.get("Node"), "Node", empty=False),
        address=_string(entry.get("ServiceAddress"), "ServiceAddress")
        or _string(entry.get("Address"), "Address", empty=False),
        port=_port(entry.get("ServicePort"), "ServicePort"),
        tags=_tags(entry.get("ServiceTags"), "ServiceTags"),
        version=meta.get(META_VERSION),
        spiffe=meta.get(META_SPIFFE),
        datacenter=_string(entry.get("Datacenter"), "Datacenter") or None,
        project=meta.get(META_PROJECT) if meta.get(META_MARK) == MARK else None,
    )


def blocking_index(header: str | None, sent: int) -> int:
    """The index for the next blocking query, from ``X-Consul-Index`` after sending ``sent``.

    As api-docs/features/blocking says: an index that went backwards resets to 0 (the next
    query answers at once with the current one), and one below 1 is taken as 1 so the next
    query does block. ValueError when the header is missing or not a number.
    """
    if header is None:
        raise ValueError("the answer has no X-Consul-Index header")
    try:
        received = int(header.strip())
    except ValueError:
        raise ValueError(f"X-Consul-Index {header!r} is not a number") from None
    if received < sent:
        return 0
    return max(received, 1)


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", type(None): "null",
            bool: "boolean"}.get(type(value), "number")


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is a JSON {_kind(value)}, not an object")
    return value


def _string(value: object, where: str, *, empty: bool = True) -> str:
    if value is None and empty:
        return ""
    if not isinstance(value, str) or (not empty and not value):
        raise ValueError(f"{where} is {value!r}, not a non-empty string" if not empty
                         else f"{where} is {value!r}, not a string")
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{where} is {value!r}, not a port")
    return value


def _tags(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{where} is {value!r}, not a list of strings")
    return tuple(value)


def _meta(value: object, where: str) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} is a JSON {_kind(value)}, not an object")
    return {str(k): v for k, v in value.items() if isinstance(v, str)}
