"""The proxy's workload identity: a key kept in memory, a certificate from the pilot, kept fresh.

Protocol: ``POST {pilot}/v1/certificate`` with a PEM PKCS#10 CSR as the body, over the
pilot's Unix socket (``proxy.pilot_client.pilot_session``). The pilot attests the caller by
what the kernel says of the socket's peer (this proxy's container) and answers ``200``
with a ``CertificateResponse`` (``composemesh.model.snapshot``), or ``403``/``503`` with an
``ErrorResponse``; ``404`` means the pilot runs no CA (it offers no
certificates, and the proxy is ready without one, asking again now and then). A fresh P-256
key is made for every request; it never leaves this process: not written to disk, not
logged, not sent (only the CSR, which carries its public half).

The certificate is renewed at half its lifetime, moved by up to ±10 % of it (jitter, so
proxies started together do not renew together); a failed request is retried with capped
exponential backoff while the current certificate stays in use. ``current()`` hands the
key, certificate, chain and trust bundle to whoever terminates TLS; ``on_rotate``
callbacks learn of every new certificate or bundle.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from composemesh.backoff import backoff_delay
from composemesh.ca import (
    cert_from_pem,
    certs_from_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    key_to_pem,
    make_csr,
    parse_spiffe,
    renew_at,
    spiffe_of,
    verify_chain,
)
from composemesh.ca.rotation import RENEW_FRACTION, RENEW_JITTER
from composemesh.clock import Clock, system_clock
from composemesh.errors import MeshError
from composemesh.model.snapshot import (
    CERTIFICATE_PATH,
    CSR_CONTENT_TYPE,
    CertificateResponse,
    ErrorResponse,
    Snapshot,
    SnapshotError,
)
from composemesh.model.wire import ContractError, decode
from composemesh.proxy.pilot_client import SERVICE_HEADER, Applier, pilot_session

REQUEST_TIMEOUT = 10.0  # seconds for one CSR round trip
CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0  # a proxy without a certificate is not ready: ask again soon
MAX_NAP = 60.0  # the clock is looked at again at least this often (suspends, clock steps)

log = logging.getLogger("composemesh.proxy.identity")

Sleep = Callable[[float], Awaitable[None]]


class IdentityError(MeshError):
    """The pilot refused a certificate, or answered with one this proxy cannot use."""


class NotOffered(IdentityError):
    """The pilot has no certificate endpoint (404): it runs no CA."""


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class WorkloadCertificate:
    """A certificate this proxy holds, with its chain and trust bundle: all public."""

    cert_pem: bytes
    chain_pem: bytes  # the leaf, then its issuers (what a TLS server presents)
    trust_bundle_pem: bytes  # the roots a peer's certificate must chain to
    spiffe: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    issuer_fingerprint: str
    renew_at: datetime

    def describe(self) -> dict[str, Any]:
        """What `/certs` and `/config_dump` show (the key is never part of it)."""
        return {
            "identity": self.spiffe,
            "serial": self.serial,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "renew_at": _iso(self.renew_at),
            "issuer_fingerprint": self.issuer_fingerprint,
            "trust_bundle": [
                {
                    "subject": c.subject.rfc4514_string(),
                    "fingerprint": fingerprint(c),
                    "not_after": _iso(c.not_valid_after_utc),
                }
                for c in certs_from_pem(self.trust_bundle_pem)
            ],
            "cert_pem": self.cert_pem.decode(),
        }


class _PrivateKey:
    """The private key, out of sight: its repr and str say nothing about it."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def pem(self) -> bytes:
        return key_to_pem(self._key)

    def public_der(self) -> bytes:
        return _spki_der(self._key.public_key())

    def __repr__(self) -> str:
        return "<private key (not shown)>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the workload's private key cannot be pickled")


class WorkloadIdentity:
    """Holds this proxy's workload certificate and key; ``run()`` keeps them fresh forever."""

    def __init__(
        self,
        pilot_url: str,
        *,
        service: str = "",
        clock: Clock = system_clock,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        renew_fraction: float = RENEW_FRACTION,
        renew_jitter: float = RENEW_JITTER,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = pilot_url.rstrip("/")
        self._base = self.url  # what requests are made to (the socket's base URL in run())
        self.service = service  # informational header, as the pilot client sends it
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.renew_fraction = renew_fraction
        self.renew_jitter = renew_jitter
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._held: tuple[WorkloadCertificate, _PrivateKey] | None = None
        self._wake = asyncio.Event()
        self.on_rotate: list[Callable[[WorkloadCertificate], None]] = []
        self.issued = 0  # certificates received
        self.failures = 0  # failed requests in a row
        self.last_error = ""
        self.last_issuance_ms: float | None = None  # key + CSR + round trip, the last time
        self.offered: bool | None = None  # does the pilot issue certificates? None: not known

    # ------------------------------------------------------------------ what it holds

    @property
    def certificate(self) -> WorkloadCertificate | None:
        return self._held[0] if self._held else None

    def held(self) -> tuple[str, str] | None:
        """(serial, not_after) of the certificate held, for the pilot's status; None if none."""
        cert = self.certificate
        return (cert.serial, _iso(cert.not_after)) if cert else None

    def current(self) -> tuple[bytes, bytes, bytes, bytes] | None:
        """``(cert_pem, key_pem, chain_pem, trust_bundle_pem)`` now in force, or None."""
        held = self._held
        if held is None:
            return None
        cert, key = held
        return cert.cert_pem, key.pem(), cert.chain_pem, cert.trust_bundle_pem

    def readiness(self) -> tuple[bool, str]:
        """Ready while it holds a certificate that has not expired."""
        cert = self.certificate
        if cert is None and self.offered is False:
            return True, ""  # the pilot runs no CA: nothing to wait for
        if cert is None:
            reason = "no workload certificate from the pilot yet"
            return False, f"{reason} ({self.last_error})" if self.last_error else reason
        if self._clock() >= cert.not_after:
            return False, f"the workload certificate expired at {_iso(cert.not_after)}"
        return True, ""

    def describe(self) -> dict[str, Any]:
        """The certificate held (public parts) and how getting it went: never the key."""
        cert = self.certificate
        return {
            **(cert.describe() if cert else {"identity": None}),
            "certificates_issued": self.issued,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_issuance_ms": self.last_issuance_ms,
            "offered": self.offered,
            "pilot": self.url,
        }

    def __repr__(self) -> str:
        cert = self.certificate
        held = f"{cert.spiffe} serial {cert.serial}" if cert else "no certificate"
        return f"<WorkloadIdentity {held}>"

    # ------------------------------------------------------------------ trust bundle

    def use_trust_bundle(self, bundle_pem: bytes) -> None:
        """A new trust bundle from a snapshot (a root rotation); renew at once if ours left it."""
        held = self._held
        if held is None or held[0].trust_bundle_pem == bundle_pem:
            return
        cert, key = held
        roots = certs_from_pem(bundle_pem)
        updated = replace(cert, trust_bundle_pem=bundle_pem)
        try:
            verify_chain(cert_from_pem(cert.cert_pem), certs_from_pem(cert.chain_pem)[1:], roots,
                         self._clock())
        except ValueError:
            log.info("the trust bundle no longer covers certificate %s; renewing", cert.serial)
            updated = replace(updated, renew_at=self._clock())
            self._wake.set()
        self._held = (updated, key)
        log.info("trust bundle updated: %d root(s)", len(roots))
        self._rotated(updated)

    def use_signing_root(self, fingerprint_hex: str) -> None:
        """The CA now signs with the certificate of ``fingerprint_hex`` (a root rotation's
        switch): a certificate from another issuer is renewed at once."""
        held = self._held
        if held is None or not fingerprint_hex:
            return
        cert, key = held
        if cert.issuer_fingerprint == fingerprint_hex or cert.renew_at <= self._clock():
            return
        log.info("the CA signs with %s now; renewing certificate %s from %s",
                 fingerprint_hex[:16], cert.serial, cert.issuer_fingerprint[:16])
        self._held = (replace(cert, renew_at=self._clock()), key)
        self._wake.set()

    # ------------------------------------------------------------------ renewal

    async def run(self, session: aiohttp.ClientSession | None = None) -> None:
        """Get a certificate, then renew each one when due; retry failures with backoff."""
        if session is None:
            timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=CONNECT_TIMEOUT)
            headers = {SERVICE_HEADER: self.service} if self.service else {}
            own, self._base = pilot_session(self.url, timeout, headers)
            async with own:
                await self._loop(own)
        else:
            await self._loop(session)

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            cert = self.certificate
            if cert is None or self._clock() >= cert.renew_at:
                try:
                    await self.renew(session)
                except NotOffered as exc:
                    if self.offered is not False:
                        log.warning("%s; serving without a workload certificate", exc)
                    self.offered = False
                    self.last_error = str(exc)
                    await self._nap(MAX_NAP)
                    continue
                except (aiohttp.ClientError, TimeoutError, IdentityError) as exc:
                    self.failures += 1
                    self.last_error = str(exc) or type(exc).__name__
                    delay = backoff_delay(self.failures, self._rng.random,
                                          self.backoff_initial, self.backoff_max)
                    kept = (f"keeping serial {cert.serial} until {_iso(cert.not_after)}"
                            if cert else "no certificate yet")
                    log.warning("certificate from %s: %s; retrying in %.1fs (%s)",
                                self.url, self.last_error, delay, kept)
                    await self._nap(delay)
                    continue
                cert = self.certificate
                assert cert is not None
            wait = (cert.renew_at - self._clock()).total_seconds()
            if wait > 0:
                await self._nap(min(wait, MAX_NAP))

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a new trust bundle asks for a renewal now."""
        self._wake.clear()
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Not awaited: a cancellation of ours arriving meanwhile must not be swallowed.
            sleeping.cancel()
            woken.cancel()

    async def renew(self, session: aiohttp.ClientSession) -> WorkloadCertificate:
        """One round: a new key and CSR, the pilot's answer checked, then put in force."""
        started = time.monotonic()
        key = _PrivateKey(generate_key())
        csr = csr_to_pem(make_csr(key._key))
        async with session.post(
            self._base + CERTIFICATE_PATH, data=csr, headers={"Content-Type": CSR_CONTENT_TYPE}
        ) as response:
            if response.status == 404:
                raise NotOffered(f"the pilot at {self.url} issues no certificates (404)")
            if response.status != 200:
                raise IdentityError(
                    f"POST {CERTIFICATE_PATH} answered {response.status}: "
                    f"{await _error_of(response)}"
                )
            try:
                answer = decode(await response.read(), CertificateResponse)
            except ContractError as exc:
                raise IdentityError(f"POST {CERTIFICATE_PATH}: the answer is not a "
                                    f"certificate: {exc}") from None
        cert = self._check(answer, key)
        self.last_issuance_ms = round((time.monotonic() - started) * 1000, 1)
        self._held = (cert, key)
        self.offered = True
        self.issued += 1
        self.failures = 0
        self.last_error = ""
        log.info("workload certificate %s serial %s valid until %s; renewing at %s",
                 cert.spiffe, cert.serial, _iso(cert.not_after), _iso(cert.renew_at))
        self._rotated(cert)
        return cert

    def _check(self, answer: CertificateResponse, key: _PrivateKey) -> WorkloadCertificate:
        """The pilot's answer as a WorkloadCertificate; IdentityError if we cannot use it."""
        try:
            cert_pem = answer.cert_pem.encode()
            chain_pem = answer.chain_pem.encode()
            bundle_pem = answer.trust_bundle_pem.encode()
            cert = cert_from_pem(cert_pem)
            chain = certs_from_pem(chain_pem)
            roots = certs_from_pem(bundle_pem)
            spiffe = spiffe_of(cert)
            parse_spiffe(spiffe)
        except ValueError as exc:
            raise IdentityError(f"the pilot's certificate is unusable: {exc}") from None
        if spiffe != answer.spiffe:
            raise IdentityError(f"the certificate names {spiffe}, the answer {answer.spiffe}")
        if _spki_der(cert.public_key()) != key.public_der():
            raise IdentityError("the certificate is not for the key this proxy asked with")
        if chain[0] != cert:
            raise IdentityError("the chain does not start with the certificate")
        now = self._clock()
        try:
            verify_chain(cert, chain[1:], roots, now)
        except ValueError as exc:
            raise IdentityError(
                f"the certificate does not chain to the trust bundle: {exc}"
            ) from None
        issuer = _issuer_of(cert, chain[1:] + roots)
        when = renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc,
                        self.renew_fraction, self.renew_jitter, self._rng)
        return WorkloadCertificate(
            cert_pem=cert_pem,
            chain_pem=chain_pem,
            trust_bundle_pem=bundle_pem,
            spiffe=spiffe,
            serial=f"{cert.serial_number:x}",
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issuer_fingerprint=fingerprint(issuer) if issuer is not None else "",
            renew_at=when,
        )

    def _rotated(self, cert: WorkloadCertificate) -> None:
        for callback in list(self.on_rotate):
            try:
                callback(cert)
            except Exception:  # one listener's bug must not stop renewal
                log.exception("on_rotate callback %r failed", callback)


def trust_bundle_applier(identity: WorkloadIdentity) -> Applier:
    """Applier: the snapshot's ``trust_bundle`` (PEM roots, public) handed to ``identity``.

    An empty or absent bundle leaves the current one; one that does not parse is a NACK.
    """

    def prepare(snapshot: Snapshot) -> Callable[[], None]:
        bundle, signing = snapshot.settings.trust_bundle, snapshot.settings.signing_root
        if not bundle:
            return lambda: None
        try:
            certs_from_pem(bundle)
        except ValueError as exc:
            raise SnapshotError(f"$.settings.trust_bundle: {exc}") from None
        data = bundle.encode()

        def commit() -> None:
            identity.use_trust_bundle(data)
            identity.use_signing_root(signing)

        return commit

    return prepare


def _spki_der(public_key: Any) -> bytes:
    """A public key (a certificate's, or our own key's) as DER SubjectPublicKeyInfo."""
    return bytes(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ))


def _issuer_of(
    cert: x509.Certificate, candidates: list[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject == cert.issuer:
            return candidate
    return None


async def _error_of(response: aiohttp.ClientResponse) -> str:
    body = await response.read()
    try:
        return decode(body, ErrorResponse).error[:500]
    except ContractError:
        return body.decode(errors="replace")[:200] or response.reason or ""
