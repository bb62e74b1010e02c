"""Decodes the top-level ``x-composemesh:`` section into validated MeshSettings."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.consul import ConsulSettings, parse_consul
from composemesh.model.egress import EgressSettings
from composemesh.model.ingress import IngressSettings
from composemesh.model.monitoring import MonitoringSettings, parse_monitoring

SECTION = "x-composemesh"
KEYS = (
    "trust_domain",
    "mtls",
    "routes",
    "policies",
    "egress",
    "gateways",
    "consul",
    "monitoring",
)
MTLS_MODES = ("STRICT", "PERMISSIVE")
MTLS_KEYS = ("mode", "services", "root", "workload_cert_ttl")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class MeshSettings:
    """Mesh-wide settings; ``raw`` is the section as written (its other parts are checked
    where they are used: routes, policies, gateways, mtls.root)."""

    trust_domain: str = wk.DEFAULT_TRUST_DOMAIN
    mtls_mode: str = "STRICT"
    mtls_overrides: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    # the ingress as `check` resolved it (file and labels merged; the pilot's ENV_INGRESS)
    ingress: IngressSettings | None = None
    egress: EgressSettings | None = None  # the same, of x-composemesh.egress (ENV_EGRESS)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    # x-composemesh.consul checked, its token read (None: no section); the token is never shown
    consul: ConsulSettings | None = None


def parse_settings(
    section: object,
    *,
    environ: Mapping[str, str] | None = None,
    base_dir: str | Path = ".",
) -> MeshSettings:
    """Validate ``x-composemesh:``; raise ConfigError naming the offending key.

    ``environ`` (default: this process's) gives CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN where
    ``consul`` names none; a relative ``consul.token_file`` is read from ``base_dir``, the
    compose file's directory. The CLI parses with the user's; the pilot parses its own copy
    of the section, whose token_file is the read-only mount the injector gave it.
    """
    if section is None:
        return MeshSettings()
    if not isinstance(section, Mapping):
        raise ConfigError("must be a mapping", field=SECTION)
    for key in section:
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(KEYS)}", field=SECTION)
    for key in ("routes", "policies", "egress", "gateways", "consul", "monitoring"):
        value = section.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError("must be a mapping", field=f"{SECTION}.{key}")

    trust_domain = section.get("trust_domain", wk.DEFAULT_TRUST_DOMAIN)
    if not isinstance(trust_domain, str) or not _DOMAIN.match(trust_domain):
        raise ConfigError(
            f"{trust_domain!r} is not a valid trust domain (lower-case DNS name)",
            field=f"{SECTION}.trust_domain",
        )

    mode, overrides = parse_mtls(section.get("mtls"))
    return MeshSettings(
        trust_domain=trust_domain,
        mtls_mode=mode,
        mtls_overrides=overrides,
        raw=dict(section),
        monitoring=parse_monitoring(section.get("monitoring")),
        consul=parse_consul(section.get("consul"),
                            environ=os.environ if environ is None else environ,
                            base_dir=base_dir),
    )


def parse_mtls(value: object) -> tuple[str, dict[str, str]]:
    """``mtls: STRICT`` or ``mtls: {mode: STRICT, services: {name: PERMISSIVE}}``."""
    where = f"{SECTION}.mtls"
    if value is None:
        return "STRICT", {}
    if isinstance(value, str):
        return _mode(value, where), {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"must be STRICT, PERMISSIVE or a mapping with {', '.join(MTLS_KEYS)}", field=where
        )
    for key in value:
        if key not in MTLS_KEYS:
            raise ConfigError(
                f"unknown key {key!r}; the keys are {', '.join(MTLS_KEYS)}", field=where
            )
    mode = _mode(value.get("mode", "STRICT"), f"{where}.mode")
    services = value.get("services") or {}
    if not isinstance(services, Mapping):
        raise ConfigError("must be a mapping of service to mode", field=f"{where}.services")
    overrides = {str(k): _mode(v, f"{where}.services.{k}") for k, v in services.items()}
    return mode, overrides


def _mode(value: object, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in MTLS_MODES:
        raise ConfigError(f"{value!r} is not one of {', '.join(MTLS_MODES)}", field=where)
    return value.upper()
