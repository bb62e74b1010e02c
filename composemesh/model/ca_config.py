"""Decodes the CA's settings under ``x-composemesh: mtls:`` into a validated CAConfig.

Pure: no file is read here (``composemesh.ca.check_user_root`` reads and checks the user's
root; ``model`` sits below ``ca`` and does not import it). The format::

    x-composemesh:
      mtls:                          # or just STRICT / PERMISSIVE
        mode: STRICT                 # STRICT (default) or PERMISSIVE
        services: {legacy: PERMISSIVE}
        workload_cert_ttl: 24h       # 90s, 2m, 24h, 7d or a number of seconds; 1m to 90d
        root:                        # bring your own root; left out: the CA generates one
          cert: certs/root.pem       # relative to the compose file's directory
          key: certs/root-key.pem
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from composemesh.errors import ConfigError
from composemesh.model.settings import SECTION, parse_mtls

MTLS = f"{SECTION}.mtls"
# Where the injector mounts the user's root in the pilot container, and the env naming it.
PILOT_ROOT_CERT = "/etc/composemesh/ca/root.pem"
PILOT_ROOT_KEY = "/etc/composemesh/ca/root-key.pem"
ENV_CA_CERT_FILE = "COMPOSEMESH_CA_CERT_FILE"
ENV_CA_KEY_FILE = "COMPOSEMESH_CA_KEY_FILE"
ROOT_KEYS = ("cert", "key")
DEFAULT_WORKLOAD_TTL_S = 24 * 3600.0  # Istio's default workload certificate lifetime
MIN_WORKLOAD_TTL_S = 60.0  # shorter would renew faster than clocks agree (1 min skew)
MAX_WORKLOAD_TTL_S = 90 * 24 * 3600.0  # Istio's max_workload_cert_ttl

_TTL = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d)?")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class CAConfig:
    """What the CA is told: the mTLS modes, its own root (if the user brings one), the TTL."""

    mode: str = "STRICT"
    overrides: Mapping[str, str] = field(default_factory=dict)  # mesh service -> mode
    root_cert_path: Path | None = None  # both set or both None
    root_key_path: Path | None = None
    workload_ttl_s: float = DEFAULT_WORKLOAD_TTL_S

    @property
    def user_root(self) -> bool:
        """True if the user brings the root; False if the CA generates its own."""
        return self.root_cert_path is not None


def parse_ca_config(mtls_section: object, base_dir: str | Path) -> CAConfig:
    """Validate ``x-composemesh: mtls:``; ConfigError naming the field on the first mistake.

    ``base_dir`` is the directory of the compose file: relative root paths are resolved
    against it.
    """
    mode, overrides = parse_mtls(mtls_section)  # None, a mode, or a mapping: checked there
    if not isinstance(mtls_section, Mapping):
        return CAConfig(mode=mode, overrides=overrides)
    ttl = DEFAULT_WORKLOAD_TTL_S
    if "workload_cert_ttl" in mtls_section:
        ttl = parse_ttl(mtls_section["workload_cert_ttl"], f"{MTLS}.workload_cert_ttl")
    cert_path, key_path = _root(mtls_section.get("root"), Path(base_dir))
    return CAConfig(
        mode=mode,
        overrides=overrides,
        root_cert_path=cert_path,
        root_key_path=key_path,
        workload_ttl_s=ttl,
    )


def parse_ttl(value: object, where: str) -> float:
    """``90s``, ``2m``, ``24h``, ``7d`` or a number of seconds -> seconds, within the bounds."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _TTL.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds is None or not math.isfinite(seconds):
        raise ConfigError(
            f"{value!r} is not a duration (like 90s, 2m, 24h, 7d or a number of seconds)",
            field=where,
        )
    if seconds < MIN_WORKLOAD_TTL_S:
        raise ConfigError(
            f"{value!r} is too short: a workload certificate lives at least 1m", field=where
        )
    if seconds > MAX_WORKLOAD_TTL_S:
        raise ConfigError(
            f"{value!r} is too long: a workload certificate lives at most 90d", field=where
        )
    return seconds


def _root(value: object, base_dir: Path) -> tuple[Path | None, Path | None]:
    where = f"{MTLS}.root"
    if value is None:
        return None, None
    if not isinstance(value, Mapping):
        raise ConfigError("must be a mapping with cert and key (paths to PEM files)", field=where)
    for key in value:
        if key not in ROOT_KEYS:
            raise ConfigError(f"unknown key {key!r}; the keys are cert, key", field=where)
    paths = []
    for key in ROOT_KEYS:
        path = value.get(key)
        if path is None:
            raise ConfigError(
                f"is missing; a root needs both cert and key (the {key} PEM file)",
                field=f"{where}.{key}",
            )
        if not isinstance(path, str) or not path.strip():
            raise ConfigError("must be the path of a PEM file", field=f"{where}.{key}")
        p = Path(path.strip()).expanduser()
        paths.append(p if p.is_absolute() else base_dir / p)
    return paths[0], paths[1]

