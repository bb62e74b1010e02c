"""The proxy's side of mutual TLS: its current TLS contexts, and whom each peer must be.

``MeshTls`` holds two client contexts and one server ``ssl.SSLContext`` built from the
workload identity (key, chain, trust bundle): ``client`` for the HTTP path's pooled
connections, ``client_tcp`` for TCP connections; each offers its protocol in ALPN, so that
the server proxy knows what comes without detecting it. They are rebuilt whole when the
certificate rotates or the trust bundle changes (``identity.on_rotate``); connections
already open keep the context they were made with, so a rotation drops nothing. Until the
proxy holds a certificate both are None: outbound connections go in plaintext, inbound TLS
is refused.

Peers are named by SPIFFE IDs: ``spiffe://<trust domain>/ns/<project>/sa/<mesh service>``.
An outbound connection to an endpoint of service S is accepted only if the peer proves to
be S (``expected``); an inbound one is attributed to the service its certificate names
(``source_service``), if that certificate is of this mesh's trust domain and project (or,
federated across hosts, of another project of the trust domain: ``<project>/<service>``).
"""

from __future__ import annotations

import logging
import ssl

from composemesh.ca import parse_spiffe
from composemesh.ca.tls import MESH_ALPN_HTTP, MESH_ALPN_TCP, client_context, server_context

log = logging.getLogger("composemesh.proxy.mtls")


class MeshTls:
    """The TLS contexts in force and the identity names of this proxy's mesh."""

    __slots__ = ("client", "client_tcp", "server", "trust_domain", "project", "_expected",
                 "rebuilt", "federated")

    def __init__(self) -> None:
        self.client: ssl.SSLContext | None = None  # HTTP/1.1 (ALPN composemesh-http/1.1)
        self.client_tcp: ssl.SSLContext | None = None  # TCP (ALPN composemesh-tcp)
        self.server: ssl.SSLContext | None = None
        self.trust_domain = ""
        self.project = ""
        self.federated = False  # other projects' identities of the trust domain let in
        self._expected: dict[str, str] = {}  # mesh service -> its SPIFFE ID
        self.rebuilt = 0  # how many times the contexts were built (rotations seen)

    @property
    def ready(self) -> bool:
        return self.client is not None

    def use(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        """Build the contexts from a certificate chain, its key and the trust bundle.

        Raises ssl.SSLError (or ValueError) if they do not make a usable pair; the contexts
        in force are then kept."""
        client = client_context(chain_pem, key_pem, bundle_pem, MESH_ALPN_HTTP)
        client_tcp = client_context(chain_pem, key_pem, bundle_pem, MESH_ALPN_TCP)
        server = server_context(chain_pem, key_pem, bundle_pem)
        self.client, self.client_tcp, self.server = client, client_tcp, server
        self.rebuilt += 1

    def name(self, trust_domain: str, project: str, federated: bool = False) -> None:
        """The trust domain and project peers must belong to (from the snapshot); with
        ``federated``, other projects of the trust domain too (other hosts' meshes)."""
        self.federated = federated
        if (trust_domain, project) != (self.trust_domain, self.project):
            self.trust_domain, self.project = trust_domain, project
            self._expected = {}

    def expected(self, service: str) -> str:
        """The SPIFFE ID an endpoint of ``service`` must present."""
        uri = self._expected.get(service)
        if uri is None:
            uri = self._expected[service] = (
                f"spiffe://{self.trust_domain}/ns/{self.project}/sa/{service}")
        return uri

    def source_service(self, spiffe: str | None) -> str | None:
        """The mesh identity a verified peer SPIFFE ID names, if it is of this trust domain;
        else None: ``<service>`` for this project's, ``<project>/<service>`` for another
        project's (another host's, sharing the root), as policies name them in ``from``."""
        if spiffe is None:
            return None
        try:
            peer = parse_spiffe(spiffe)
        except ValueError:
            return None
        if peer.trust_domain != self.trust_domain:
            return None
        if peer.namespace != self.project:
            return f"{peer.namespace}/{peer.service}" if self.federated else None
        return peer.service
