"""The pilot's mutual-TLS port (15012): its own certificate from its own CA, kept current.

The pilot's certificate names ``spiffe://<td>/ns/<project>/sa/composemesh-pilot`` and the
DNS name ``composemesh-pilot`` (the host name proxies dial); its key is made here and lives
in memory only (``ca.tls`` loads it through an anonymous memory file). The listening socket
keeps the context it was opened with; each handshake is handed the current context
(``sni_callback``, called for every ClientHello, with or without SNI). The current context
is made anew when the certificate reaches half-life, the signing root changes or the trust
bundle changes (each step of a root rotation): a handshake after the change sees it, an open
connection is not disturbed.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from composemesh.ca import (
    IssuanceRefused,
    SpiffeId,
    cert_from_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    key_to_pem,
    make_csr,
    renew_at,
)
from composemesh.ca.tls import server_context
from composemesh.model import wellknown as wk
from composemesh.pilot.ca_service import CAService

log = logging.getLogger("composemesh.pilot.tls")

Clock = Callable[[], datetime]


def _system_clock() -> datetime:
    return datetime.now(UTC)


def pilot_identity(ca: CAService) -> SpiffeId:
    """The pilot's own SPIFFE ID: ``spiffe://<td>/ns/<project>/sa/composemesh-pilot``."""
    return SpiffeId(ca.authority.trust_domain, ca.project, wk.PILOT_SERVICE)


class PilotTLS:
    """The server side of the pilot's mTLS port: a client certificate of the mesh required."""

    def __init__(self, ca: CAService, clock: Clock = _system_clock) -> None:
        self.ca = ca
        self.spiffe = pilot_identity(ca)
        self._clock = clock
        self._made_for: tuple[str, str] = ("", "")  # (signing root, trust bundle)
        self._renew_at = clock()
        self.cert_pem = b""
        self._current = self._make()
        self.context = self._current  # what the listening socket is opened with
        self.context.sni_callback = self._on_client_hello

    def current(self) -> ssl.SSLContext:
        """The context for a handshake now, made anew first if it is due.

        A renewal that fails keeps the current context (its certificate is still valid
        until its expiry) and is logged; the next handshake tries again.
        """
        if self._due():
            try:
                self._current = self._make()
            except (IssuanceRefused, ssl.SSLError, ValueError) as exc:
                log.error("cannot renew the pilot's certificate, keeping the current one: %s",
                          getattr(exc, "reason", exc))
        return self._current

    def _due(self) -> bool:
        return self._clock() >= self._renew_at or self._made_for != self._ca_view()

    def _ca_view(self) -> tuple[str, str]:
        return fingerprint(self.ca.root_cert), self.ca.trust_bundle_pem

    def _make(self) -> ssl.SSLContext:
        view = self._ca_view()
        key = generate_key()
        signed = self.ca.authority.sign_server(
            csr_to_pem(make_csr(key, self.spiffe.uri)), self.spiffe, [wk.PILOT_SERVICE]
        )
        context = server_context(signed.chain_pem, key_to_pem(key), view[1].encode())
        cert = cert_from_pem(signed.cert_pem)
        self.cert_pem = signed.cert_pem
        self._made_for = view
        self._renew_at = renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc)
        log.info("pilot certificate %s serial %x until %s, signed by %s", self.spiffe.uri,
                 cert.serial_number, cert.not_valid_after_utc.isoformat(), view[0])
        return context

    def _on_client_hello(self, ssl_object: Any, server_name: str | None,
                         context: ssl.SSLContext) -> None:
        ssl_object.context = self.current()
