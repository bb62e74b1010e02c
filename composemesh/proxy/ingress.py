"""The ingress gateway's listeners: traffic entering the mesh from the host's published ports.

The gateway is the composemesh proxy in another role (``COMPOSEMESH_GATEWAY=ingress``): the
same data path, snapshots and identity as a sidecar, with no app in its namespace. Beside
its capture listeners it listens on two ports of its own, published on the host:

- HTTPS (``INGRESS_HTTPS_PORT``): TLS ends here, each host's certificate chosen by the
  client's SNI (``gateway_tls.ingress_context``; the files are mounted read-only under
  ``INGRESS_CERT_DIR/<host>/``);
- HTTP (``INGRESS_HTTP_PORT``): answered 308 to the https URL where the file says
  ``redirect_to_https``, else routed like HTTPS.

Each request then takes the HTTP path an app's request takes (``HttpPath``, outbound): its
Host and longest path prefix name a mesh service and port (the snapshot's ingress routes,
``router.IngressTable``; no route: 404), and from there the service's weights, matches,
retries, timeouts and faults apply, over mTLS with the gateway's own identity.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from composemesh.model import wellknown as wk
from composemesh.model.gateways import TLSFiles
from composemesh.proxy.gateway_tls import ingress_context
from composemesh.proxy.http import HttpDownstream, HttpPath, IngressCaller

log = logging.getLogger("composemesh.proxy.ingress")

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def mounted_certificates(root: Path) -> dict[str, TLSFiles]:
    """The hosts whose certificate and key are mounted under ``root`` (one folder each),
    sorted by name (the first is served to a client that names no known host)."""
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(root.iterdir()):
        cert, key = folder / CERT_FILE, folder / KEY_FILE
        if cert.is_file() and key.is_file():
            found[folder.name] = TLSFiles(cert=cert, key=key)
    return found


def server_context(root: Path) -> ssl.SSLContext | None:
    """The HTTPS listener's context from the mounted certificates (None: there are none)."""
    hosts = mounted_certificates(root)
    return ingress_context(hosts) if hosts else None


async def start_ingress(
    http: HttpPath, *, host: str = "0.0.0.0",  # noqa: S104 (the gateway's own namespace)
    http_port: int | None = wk.INGRESS_HTTP_PORT, https_port: int | None = wk.INGRESS_HTTPS_PORT,
    cert_dir: Path = Path(wk.INGRESS_CERT_DIR),
) -> list[asyncio.Server]:
    """The ingress listeners on ``host``: HTTPS where certificates are mounted, HTTP unless
    ``http_port`` is None. Each connection is an ``HttpDownstream`` of ``http`` whose caller
    is outside (``IngressCaller``)."""
    loop = asyncio.get_running_loop()
    servers = []
    context = server_context(cert_dir) if https_port is not None else None
    if context is not None:
        servers.append(await loop.create_server(
            lambda: HttpDownstream(http, "", 0, IngressCaller("https")), host, https_port,
            ssl=context, ssl_handshake_timeout=10.0, backlog=1024))
        log.info("ingress: https on %s:%d for %s", host, https_port,
                 ", ".join(mounted_certificates(cert_dir)))
    if http_port is not None:
        servers.append(await loop.create_server(
            lambda: HttpDownstream(http, "", 0, IngressCaller("http")), host, http_port,
            backlog=1024))
        log.info("ingress: http on %s:%d", host, http_port)
    return servers
