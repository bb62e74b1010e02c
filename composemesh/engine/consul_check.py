"""`up`'s look at Consul before anything starts: a refused token or an unknown datacenter is an
error (nothing is started), an agent that does not answer is a warning (the mesh works locally
and its pilot registers once Consul comes).

One read, as the pilot will make it (``GET /v1/catalog/services`` with the token and the
datacenter), from the host: where the host cannot reach an address the containers can, the
answer is only a warning too.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request

from composemesh.errors import ConfigError
from composemesh.model.consul import CONSUL, ConsulSettings

TIMEOUT_S = 3.0


def consul_preflight(settings: ConsulSettings, *, origin: str = "",
                     timeout: float = TIMEOUT_S) -> str | None:
    """None if Consul answers and takes the token; the warning to show if it does not answer;
    ConfigError naming ``token_file`` (or ``datacenter``) if it refuses."""
    query = {"dc": settings.datacenter} if settings.datacenter else {}
    url = f"{settings.address}/v1/catalog/services"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, method="GET")
    if settings.token:
        request.add_header("X-Consul-Token", settings.token)
    where = f" ({origin})" if origin else ""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) only
            answer.read(1024 * 1024)
        return None
    except urllib.error.HTTPError as exc:
        text = _first_line(exc.read(512))
        if exc.code == 403:
            raise ConfigError(
                f"Consul at {settings.address} refused the ACL token{where}: {text or 'HTTP 403'}"
                + ("" if settings.token else " (no token was given: set token_file or "
                   "CONSUL_HTTP_TOKEN)"),
                field=f"{CONSUL}.token_file") from None
        if exc.code == 500 and "datacenter" in text.lower():
            raise ConfigError(f"Consul at {settings.address} has no datacenter "
                              f"{settings.datacenter!r}: {text}",
                              field=f"{CONSUL}.datacenter") from None
        return (f"Consul at {settings.address} answered HTTP {exc.code} ({text}): the pilot "
                f"will keep trying; the mesh works locally meanwhile")
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return (f"Consul at {settings.address} does not answer ({reason}): the mesh starts and "
                f"works locally; its pilot registers and imports once Consul answers")


def _first_line(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip().splitlines()[0][:200] if raw.strip() else ""
