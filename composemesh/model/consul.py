"""``x-composemesh.consul`` read into ConsulSettings, and the two kinds of catalog entry.

```yaml
x-composemesh:
  consul:
    address: http://consul.internal:8500   # or CONSUL_HTTP_ADDR
    token_file: ./consul.token             # or CONSUL_HTTP_TOKEN; ACLs supported
    datacenter: dc1
    host_address: 192.0.2.10               # where other hosts reach this host's east-west gateway
    east_west_port: 15443                  # published on the host by the east-west gateway
```

The file wins over the environment: ``address`` over ``CONSUL_HTTP_ADDR``, ``token_file``
over ``CONSUL_HTTP_TOKEN``. Every mistake is one ConfigError naming its key. ExportedInstance
is what this host registers (one mesh service instance); CatalogInstance is what the catalog
says of one instance of any service, this project's or not.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from composemesh.errors import ConfigError

CONSUL = "x-composemesh.consul"
KEYS = ("address", "token_file", "datacenter", "host_address", "east_west_port")
ENV_ADDRESS = "CONSUL_HTTP_ADDR"
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
DEFAULT_EAST_WEST_PORT = 15443
# Consul's own rule for a datacenter's name (the agent refuses any other).
_DATACENTER = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class ConsulSettings:
    """The section, checked: which agent, with which token, and how other hosts reach us."""

    address: str  # the agent's HTTP API, e.g. http://consul.internal:8500 (no trailing /)
    token: str | None = field(default=None, repr=False)  # an ACL token's secret; never shown
    datacenter: str | None = None  # None: the agent's own
    host_address: str = ""  # the IP other hosts reach this host's east-west gateway at
    east_west_port: int = DEFAULT_EAST_WEST_PORT


@dataclass(frozen=True, slots=True)
class ExportedInstance:
    """One instance of one of this project's mesh services, as the pilot registers it."""

    project: str
    compose_service: str
    instance: int  # compose's container number, 1-based
    service: str  # the mesh service: the name it has in the catalog
    version: str
    spiffe: str  # spiffe://<trust domain>/ns/<project>/sa/<service>
    healthy: bool = True  # the check's status at registration: passing or critical


@dataclass(frozen=True, slots=True)
class CatalogInstance:
    """One instance of a service as the catalog lists it."""

    service: str
    id: str  # the service instance's ID in Consul (unique on its node)
    node: str
    address: str  # the service's address, or its node's when it registered none
    port: int
    tags: tuple[str, ...] = ()
    version: str | None = None  # Meta.version
    spiffe: str | None = None  # Meta.spiffe
    datacenter: str | None = None
    project: str | None = None  # Meta.project of a composemesh registration, else None


@dataclass(frozen=True, slots=True)
class ConsulView:
    """What the pilot's Consul source knows now: whether the agent answers, what this project
    has registered, and the passing instances of everything else in the catalog."""

    reachable: bool = False
    error: str = ""  # the last problem, one sentence ("" none)
    error_kind: str = ""  # ConsulError.kind of it: unreachable, acl, status, invalid
    exported: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # service -> IDs
    # service -> its passing instances that are not this project's own registrations
    imported: Mapping[str, tuple[CatalogInstance, ...]] = field(default_factory=dict)
    changed_at: float = 0.0  # time.time() of the catalog change this view reflects


def parse_consul(
    section: object, *, environ: Mapping[str, str], base_dir: str | Path
) -> ConsulSettings | None:
    """``x-composemesh.consul`` checked (None when absent); ConfigError naming the bad key.

    ``environ`` supplies CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN where the file is silent;
    a relative ``token_file`` is read from ``base_dir``, the compose file's directory.
    """
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError("must be a mapping", field=CONSUL)
    for key in section:
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(KEYS)}", field=CONSUL)
    return ConsulSettings(
        address=_address(section.get("address"), environ.get(ENV_ADDRESS)),
        token=_token(section.get("token_file"), environ.get(ENV_TOKEN), Path(base_dir)),
        datacenter=_datacenter(section.get("datacenter")),
        host_address=_host_address(section.get("host_address")),
        east_west_port=_port(section.get("east_west_port", DEFAULT_EAST_WEST_PORT)),
    )


def _address(value: object, env: str | None) -> str:
    where = f"{CONSUL}.address"
    if value is None:
        if not env:
            raise ConfigError(
                f"is missing: give the Consul agent's http:// or https:// URL here or in "
                f"{ENV_ADDRESS}", field=where)
        # As Consul's own CLI reads it: host:port without a scheme means http.
        text = env.strip() if "://" in env else f"http://{env.strip()}"
        return _url(text, where, f" (from {ENV_ADDRESS})")
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not an http:// or https:// URL", field=where)
    return _url(value.strip(), where, "")


def _url(text: str, where: str, source: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        raise ConfigError(f"{text!r}{source} is not an http:// or https:// URL",
                          field=where) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{text!r}{source} is not an http:// or https:// URL", field=where)
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"{text!r}{source} must be the agent's address alone, like "
            f"http://consul.internal:8500 (no path, query or user)", field=where)
    return f"{parts.scheme}://{parts.netloc}"


def _token(value: object, env: str | None, base_dir: Path) -> str | None:
    where = f"{CONSUL}.token_file"
    if value is None:
        if env is None or not env.strip():
            return None
        token = env.strip()
        source = ENV_TOKEN
    else:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("must be the path of a file holding the ACL token", field=where)
        path = Path(value.strip()).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ConfigError(f"cannot read {str(path)!r}: {reason}", field=where) from None
        if not token:
            raise ConfigError(f"{str(path)!r} is empty; it must hold the ACL token", field=where)
        source = repr(str(path))
    if any(c.isspace() or not c.isprintable() for c in token):
        # never echo the token itself
        raise ConfigError(f"the token in {source} has spaces or control characters inside",
                          field=where)
    return token


def _datacenter(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DATACENTER.fullmatch(value):
        raise ConfigError(
            f"{value!r} is not a Consul datacenter name (lower-case letters, digits, - and _)",
            field=f"{CONSUL}.datacenter")
    return value


def _host_address(value: object) -> str:
    where = f"{CONSUL}.host_address"
    if value is None:
        raise ConfigError("is missing: the IP address other hosts reach this host's "
                          "east-west gateway at", field=where)
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address", field=where) from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"{value!r} is not an address other hosts can reach", field=where)
    return str(address)


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{value!r} is not a port (1-65535)", field=f"{CONSUL}.east_west_port")
    return value
