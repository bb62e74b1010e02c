"""Decodes a compose service's ``composemesh.*`` labels into a typed MeshLabels.

One decoder, two callers (like Traefik's ``label.Decode``): ``decode_labels`` turns a flat
mapping of labels into a MeshLabels and the list of what was wrong, each problem naming its
label; the caller chooses what a problem means. The CLI (``parse_labels``: ``check``,
``inject``) refuses the service on the first one; the pilot (``pilot.sources.docker.convert``)
meshes the container with what did decode and logs the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
    wk.LABEL_INGRESS_HOST,
    wk.LABEL_INGRESS_PATH,
    wk.LABEL_INGRESS_PORT,
    f"{LIMITS_PREFIX}<limit>",
)
# Set by the injector itself; accepted on input so that injecting twice changes nothing.
INJECTOR_LABELS = (wk.LABEL_ROLE, wk.LABEL_OF, wk.LABEL_INSTANCE, wk.LABEL_GATEWAY)


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
    # the composemesh.ingress.* labels as written (model.gateways.route_from_labels checks
    # them against the service's ports); None: not given
    ingress: tuple[str | None, str | None, str | None] = (None, None, None)

    def protocol_for(self, port: int) -> str | None:
        """The declared protocol of ``port``: its own label first, then the service's."""
        return self.port_protocols.get(port, self.protocol)


@dataclass(frozen=True, slots=True)
class LabelError:
    """One label that did not decode: its name, its value as written, and why (a sentence)."""

    label: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"label {self.label}: {self.reason}"

    def config_error(self, compose_service: str) -> ConfigError:
        """The CLI's error for it: names the service and the label."""
        return ConfigError(self.reason, service=compose_service, field=f"label {self.label}")


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


def decode_labels(
    labels: Mapping[str, str], *, compose_service: str
) -> tuple[MeshLabels, tuple[LabelError, ...]]:
    """The ``composemesh.*`` labels of compose service ``compose_service``, and their problems.

    Labels outside ``composemesh.`` are ignored. A label that does not decode is a problem
    and its field keeps its default (the mesh service's default is ``compose_service``, itself
    a problem when it is not a valid mesh name). Problems come in the order the CLI has always
    reported them: unknown labels, then enable, service, version, weight, protocol, the port
    labels, and the proxy limits (by name).
    """
    problems: list[LabelError] = []

    def bad(label: str, reason: str, value: str | None = None) -> None:
        problems.append(LabelError(label, labels.get(label, "") if value is None else value,
                                   reason))

    for key in labels:
        if not key.startswith(wk.LABEL_PREFIX) or key in INJECTOR_LABELS:
            continue
        if key in KNOWN_LABELS or _PORT_LABEL.match(key) or key.startswith(LIMITS_PREFIX):
            continue
        bad(key, f"unknown label; known labels are {', '.join(KNOWN_LABELS)}")

    enabled = True
    if wk.LABEL_ENABLE in labels:
        value = labels[wk.LABEL_ENABLE].strip().lower()
        if value in _FALSE:
            enabled = False
        elif value not in _TRUE:
            bad(wk.LABEL_ENABLE, f"{labels[wk.LABEL_ENABLE]!r} is not true or false")

    service = labels.get(wk.LABEL_SERVICE, compose_service)
    if not _NAME.match(service):
        bad(
            wk.LABEL_SERVICE,
            f"{service!r} is not a valid mesh service name "
            "(lower-case letters, digits, '-', '_' and '.', at most 63)",
            value=service,
        )
        service = compose_service

    version = labels.get(wk.LABEL_VERSION, wk.DEFAULT_VERSION)
    if not _NAME.match(version):
        bad(
            wk.LABEL_VERSION,
            f"{version!r} is not a valid version name "
            "(lower-case letters, digits, '-', '_' and '.', at most 63)",
        )
        version = wk.DEFAULT_VERSION

    weight: int | None = None
    if wk.LABEL_WEIGHT in labels:
        raw = labels[wk.LABEL_WEIGHT].strip()
        if re.fullmatch(r"\d+", raw):
            weight = int(raw)
        else:
            bad(wk.LABEL_WEIGHT, f"{labels[wk.LABEL_WEIGHT]!r} is not a non-negative integer")

    protocol = None
    if wk.LABEL_PROTOCOL in labels:
        protocol = _protocol(labels[wk.LABEL_PROTOCOL])
        if protocol is None:
            bad(wk.LABEL_PROTOCOL, _not_a_protocol(labels[wk.LABEL_PROTOCOL]))

    port_protocols: dict[int, str] = {}
    for key, value in labels.items():
        m = _PORT_LABEL.match(key)
        if not m:
            continue
        # isdecimal, not isdigit: int() refuses digits such as '²' that isdigit accepts.
        if not m.group(1).isdecimal() or not 1 <= int(m.group(1)) <= 65535:
            bad(key, f"{m.group(1)!r} is not a port number (1-65535)")
            continue
        proto = _protocol(value)
        if proto is None:
            bad(key, _not_a_protocol(value))
            continue
        port_protocols[int(m.group(1))] = proto

    limits, limit_problems = _limits(labels, compose_service)
    problems.extend(limit_problems)

    decoded = MeshLabels(
        enabled=enabled,
        service=service,
        version=version,
        weight=weight,
        protocol=protocol,
        port_protocols=MappingProxyType(port_protocols),
        limits=limits,
        ingress=(labels.get(wk.LABEL_INGRESS_HOST), labels.get(wk.LABEL_INGRESS_PATH),
                 labels.get(wk.LABEL_INGRESS_PORT)),
    )
    return decoded, tuple(problems)


def parse_labels(labels: Mapping[str, str], *, compose_service: str) -> MeshLabels:
    """Validate the ``composemesh.*`` labels of one compose service.

    Raises ConfigError naming the service and the label on the first bad one.
    """
    decoded, problems = decode_labels(labels, compose_service=compose_service)
    if problems:
        raise problems[0].config_error(compose_service)
    return decoded


def _protocol(value: str) -> str | None:
    proto = value.strip().lower()
    return proto if proto in PROTOCOLS else None


def _not_a_protocol(value: str) -> str:
    return f"{value!r} is not a known protocol (one of {', '.join(PROTOCOLS)})"


def _limits(
    labels: Mapping[str, str], compose_service: str
) -> tuple[ProxyLimits, list[LabelError]]:
    """The ``composemesh.proxy.*`` labels through model.limits, one label at a time, so that
    a bad one is a problem of its own and the good ones still count (each label is checked
    on its own there, so checking them apart changes no verdict)."""
    good: dict[str, str] = {}
    problems: list[LabelError] = []
    for label in sorted(labels):
        if not label.startswith(LIMITS_PREFIX):
            continue
        try:
            parse_limits({label: labels[label]}, compose_service)
        except ConfigError as exc:
            problems.append(LabelError(label, labels[label], exc.message))
        else:
            good[label] = labels[label]
    return parse_limits(good, compose_service), problems
