"""The mesh's certificate authority: signs a workload CSR for the identity attestation found.

``CertificateAuthority.sign`` is the one place a workload certificate is issued (Istio's
``Sign(csr, opts)``). The identity comes from the caller's attestation (who the pilot saw
at the caller's address), never from the CSR: a CSR may carry no SAN at all, and one that
asks for another identity is refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from composemesh.ca import pki
from composemesh.ca.rotation import Root, RootSet, steady
from composemesh.ca.spiffe import SpiffeId, WorkloadName, trust_domain_uri
from composemesh.clock import Clock, system_clock
from composemesh.errors import ConfigError, MeshError
from composemesh.model.ca_config import MTLS, CAConfig

MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is under 1 KiB in PEM


class IssuanceRefused(MeshError):
    """The CA will not sign this request; ``reason`` is the sentence the caller is told."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignedCertificate:
    """What the CA hands back for a CSR.

    ``chain_pem`` is the leaf followed by its issuer up to the signing root: what a proxy
    loads as its certificate chain (``ssl.SSLContext.load_cert_chain``).
    """

    cert_pem: bytes
    chain_pem: bytes
    spiffe: SpiffeId
    not_after: datetime


class CertificateAuthority:
    """Signs workload certificates of one trust domain with the active root of a RootSet."""

    def __init__(
        self,
        root_cert: x509.Certificate,
        root_key: pki.IssuerKey,
        trust_domain: str,
        workload_ttl: timedelta = pki.WORKLOAD_LIFETIME,
        clock: Clock = system_clock,
    ) -> None:
        if workload_ttl <= timedelta(0):
            raise ValueError("the workload certificate TTL must be more than 0")
        trust_domain_uri(trust_domain)  # ValueError for a bad trust domain
        self.trust_domain = trust_domain
        self.workload_ttl = workload_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._roots = steady(Root(root_cert, root_key))
        self._signed = 0

    # ------------------------------------------------------------------ roots

    @property
    def roots(self) -> RootSet:
        """The current root set (which root signs, which are trusted)."""
        return self._roots

    def use_roots(self, roots: RootSet) -> None:
        """Adopt the next step of a root rotation (see ``composemesh.ca.rotation``)."""
        with self._lock:
            self._roots = roots

    def trust_bundle(self) -> bytes:
        """The PEM roots a peer must trust: one, or both during a root rotation."""
        return self._roots.bundle_pem

    @property
    def signed(self) -> int:
        """How many certificates this CA has signed."""
        return self._signed

    # ------------------------------------------------------------------ issuance

    def sign(self, csr_pem: bytes | str, attested: SpiffeId,
             workload: WorkloadName | None = None) -> SignedCertificate:
        """A certificate for the CSR's key naming ``attested`` (and ``workload``, its attested
        compose service and version, in the subject); IssuanceRefused saying why not."""
        if attested.trust_domain != self.trust_domain:
            raise IssuanceRefused(
                f"the identity {attested.uri} is in trust domain {attested.trust_domain!r}; "
                f"this CA signs for {self.trust_domain!r}"
            )
        csr = self._check_csr(csr_pem, attested)
        roots = self._roots
        issuer = roots.active
        now = self._clock()
        try:
            cert = pki.sign_workload(
                csr, issuer.cert, issuer.key, attested.uri, self.workload_ttl, now=now,
                workload=workload,
            )
        except ValueError as exc:
            raise IssuanceRefused(f"cannot sign: {exc}") from None
        with self._lock:
            self._signed += 1
        cert_pem = pki.cert_to_pem(cert)
        return SignedCertificate(
            cert_pem=cert_pem,
            chain_pem=cert_pem + pki.cert_to_pem(issuer.cert),
            spiffe=attested,
            not_after=cert.not_valid_after_utc,
        )

    def _check_csr(
        self, csr_pem: bytes | str, attested: SpiffeId
    ) -> x509.CertificateSigningRequest:
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if not isinstance(data, bytes):
            raise IssuanceRefused("the CSR must be PEM bytes")
        if len(data) > MAX_CSR_BYTES:
            raise IssuanceRefused(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
        try:
            csr = pki.csr_from_pem(data)
            public_key = csr.public_key()
        except ValueError as exc:
            raise IssuanceRefused(f"the CSR is malformed: {exc}") from None
        except Exception:  # an unsupported key type, say: nothing foreign leaks out
            raise IssuanceRefused("the CSR is malformed: its key cannot be read") from None
        try:
            pki.check_workload_key(public_key)
        except ValueError as exc:
            raise IssuanceRefused(str(exc)) from None
        if not pki.csr_signature_ok(csr):
            raise IssuanceRefused("the CSR's signature does not verify with its own key")
        try:
            uris, others = pki.uri_sans(csr)
        except ValueError as exc:
            raise IssuanceRefused(f"the CSR's extensions are malformed: {exc}") from None
        if others:
            raise IssuanceRefused("the CSR asks for DNS, IP or other names; only the SPIFFE ID")
        if uris and uris != [attested.uri]:
            raise IssuanceRefused(
                f"the CSR asks for {', '.join(uris)} but the caller was attested as {attested.uri}"
            )
        return csr


def check_user_root(config: CAConfig, now: datetime | None = None) -> Root | None:
    """The user's own root named in ``config`` (None if they bring none), read and checked.

    ConfigError naming ``x-composemesh.mtls.root.cert`` or ``.key`` with the reason: a file
    that cannot be read or parsed, not a CA, a key that does not match, expired, not yet valid.
    """
    if config.root_cert_path is None or config.root_key_path is None:
        return None
    files = {"cert": config.root_cert_path, "key": config.root_key_path}
    data = {}
    for part, path in files.items():
        try:
            data[part] = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {path}: {exc.strerror or exc}", field=f"{MTLS}.root.{part}"
            ) from None
    try:
        cert, key = pki.load_user_root(data["cert"], data["key"], now)
    except pki.RootError as exc:
        raise ConfigError(
            f"{exc.reason} ({files[exc.part]})", field=f"{MTLS}.root.{exc.part}"
        ) from None
    return Root(cert, key)
