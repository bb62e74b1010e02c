"""Decodes a compose service's ``composemesh.*`` labels into a typed, validated MeshLabels."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.limits import LABEL_PREFIX as LIMITS_PREFIX
from composemesh.model.limits import ProxyLimits, parse_limits

PROTOCOLS = ("http", "tcp")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")
_PORT_LABEL = re.compile("^" + re.escape(wk.LABEL_PORT_PREFIX) + r"([^.]+)\.protocol$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
KNOWN_LABELS = (
    wk.LABEL_ENABLE,
    wk.LABEL_SERVICE,
    wk.LABEL_VERSION,
    wk.LABEL_WEIGHT,
    wk.LABEL_PROTOCOL,
    "composemesh.port.<N>.protocol",
    f"{LIMITS_PREFIX}<limit>",
)
# Set by the injector itself; accepted on input so that injecting twice changes nothing.
INJECTOR_LABELS = (wk.LABEL_ROLE, wk.LABEL_OF, wk.LABEL_INSTANCE)


@dataclass(frozen=True)
class MeshLabels:
    """What a compose service's labels say about its place in the mesh."""

    enabled: bool
    service: str  # mesh service name (several compose services may share one)
    version: str  # subset name
    weight: int | None  # None: an equal share with the other versions
    protocol: str | None  # None: detect (http where the port speaks HTTP/1.1)
    port_protocols: Mapping[int, str] = field(default_factory=dict)
    limits: ProxyLimits = field(default_factory=ProxyLimits)  # composemesh.proxy.* labels

    def protocol_for(self, port: int) -> str | None:
        """The declared protocol of ``port``: its own label first, then the service's."""
        return self.port_protocols.get(port, self.protocol)


def normalize_labels(raw: object, *, service: str) -> dict[str, str]:
    """Compose allows labels as a mapping or a list of ``key=value``; return a mapping."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in raw.items()}
    if isinstance(raw, list):
        out: dict[str, str] = {}
        for item in raw:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    raise ConfigError("must be a mapping or a list of key=value", service=service, field="labels")


def parse_labels(labels: Mapping[str, str], *, compose_service: str) -> MeshLabels:
    """Validate the ``composemesh.*`` labels of one compose service.

    Raises ConfigError naming the service and the label on the first bad one.
    """

    def bad(label: str, message: str) -> ConfigError:
        return ConfigError(message, service=compose_service, field=f"label {label}")

    for key in labels:
        if not key.startswith(wk.LABEL_PREFIX) or key in INJECTOR_LABELS:
            continue
        if key in KNOWN_LABELS or _PORT_LABEL.match(key) or key.startswith(LIMITS_PREFIX):
            continue
        raise bad(key, f"unknown label; known labels are {', '.join(KNOWN_LABELS)}")

    enabled = True
    if wk.LABEL_ENABLE in labels:
        value = labels[wk.LABEL_ENABLE].strip().lower()
        if value in _TRUE:
            enabled = True
        elif value in _FALSE:
            enabled = False
        else:
            raise bad(wk.LABEL_ENABLE, f"{labels[wk.LABEL_ENABLE]!r} is not true or false")

    service = labels.get(wk.LABEL_SERVICE, compose_service)
    if not _NAME.match(service):
        raise bad(
            wk.LABEL_SERVICE,
            f"{service!r} is not a valid mesh service name "
            "(lower-case letters, digits, '-', '_' and '.', at most 63)",
        )

    version = labels.get(wk.LABEL_VERSION, wk.DEFAULT_VERSION)
    if not _NAME.match(version):
        raise bad(
            wk.LABEL_VERSION,
            f"{version!r} is not a valid version name "
            "(lower-case letters, digits, '-', '_' and '.', at most 63)",
        )

    weight: int | None = None
    if wk.LABEL_WEIGHT in labels:
        raw = labels[wk.LABEL_WEIGHT].strip()
        if not re.fullmatch(r"\d+", raw):
            raise bad(wk.LABEL_WEIGHT, f"{labels[wk.LABEL_WEIGHT]!r} is not a non-negative integer")
        weight = int(raw)

    protocol = None
    if wk.LABEL_PROTOCOL in labels:
        protocol = _protocol(labels[wk.LABEL_PROTOCOL], bad(wk.LABEL_PROTOCOL, ""))

    port_protocols: dict[int, str] = {}
    for key, value in labels.items():
        m = _PORT_LABEL.match(key)
        if not m:
            continue
        if not m.group(1).isdigit() or not 1 <= int(m.group(1)) <= 65535:
            raise bad(key, f"{m.group(1)!r} is not a port number (1-65535)")
        port_protocols[int(m.group(1))] = _protocol(value, bad(key, ""))

    return MeshLabels(
        enabled=enabled,
        service=service,
        version=version,
        weight=weight,
        protocol=protocol,
        port_protocols=port_protocols,
        limits=parse_limits(labels, compose_service),
    )


def _protocol(value: str, template: ConfigError) -> str:
    proto = value.strip().lower()
    if proto not in PROTOCOLS:
        raise ConfigError(
            f"{value!r} is not a known protocol (one of {', '.join(PROTOCOLS)})",
            service=template.service,
            field=template.field,
        )
    return proto
