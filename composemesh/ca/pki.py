"""Certificate building and checking as pure functions over ``cryptography``: no I/O, no state.

Workload certificates are X.509-SVIDs: an ECDSA P-256 key, CA:false, digitalSignature, EKU
serverAuth and clientAuth, and exactly one URI SAN, the SPIFFE ID (critical, with an empty
subject, as Istio issues them). Every function that depends on the time takes ``now``
(default: the system clock), so tests and the authority decide what time it is.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from composemesh.ca.spiffe import WorkloadName, trust_domain_uri

# Lifetimes and limits (mitmproxy's certs.py keeps its expiry constants up here too).
ROOT_LIFETIME = timedelta(days=3650)  # a generated root: ten years
INTERMEDIATE_LIFETIME = timedelta(days=365)
WORKLOAD_LIFETIME = timedelta(hours=24)  # Istio's default workload certificate TTL
CLOCK_SKEW = timedelta(minutes=1)  # not_before is back-dated this much for clocks behind ours
ROOT_PATH_LENGTH = 1  # a root may sign one level of intermediates, then workloads
WORKLOAD_CURVE = ec.SECP256R1
MIN_RSA_BITS = 2048  # for a user's own RSA root
MIN_EC_BITS = 256
MAX_CHAIN_DEPTH = 4

IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class RootError(ValueError):
    """A user's root (certificate and key) that the CA cannot use; ``part`` says which file."""

    def __init__(self, part: Literal["cert", "key"], reason: str) -> None:
        super().__init__(reason)
        self.part = part
        self.reason = reason


# --------------------------------------------------------------------------- keys and names


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(WORKLOAD_CURVE())


def check_workload_key(public_key: object) -> None:
    """ValueError unless ``public_key`` is an ECDSA P-256 public key (the only kind we sign)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = public_key.curve
        if curve.key_size < MIN_EC_BITS:
            raise ValueError(f"the EC key on {curve.name} is too weak ({curve.key_size} bits)")
        if not isinstance(curve, WORKLOAD_CURVE):
            raise ValueError(f"the EC key is on {curve.name}; workload keys must be P-256")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"the key is RSA-{public_key.key_size}; workload keys must be ECDSA P-256")
    raise ValueError(f"the key is {_key_kind(public_key)}; workload keys must be ECDSA P-256")


def _key_kind(key: object) -> str:
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name.lstrip("_") or "of an unknown kind"


def _check_issuer_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size < MIN_EC_BITS:
            raise ValueError(f"the EC key on {key.curve.name} is too weak")
        return
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"the RSA key has {key.key_size} bits; a CA key needs at least {MIN_RSA_BITS}"
            )
        return
    raise ValueError(f"the key is {_key_kind(key)}; a CA key must be EC or RSA")


def _hash_for(key: IssuerKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _ski(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


# --------------------------------------------------------------------------- CA certificates


def _ca_name(common_name: str, trust_domain: str) -> x509.Name:
    """A CA's subject: the trust domain as its organization, then its common name."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def make_root(
    common_name: str,
    trust_domain: str,
    lifetime: timedelta = ROOT_LIFETIME,
    *,
    now: datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 root for ``trust_domain``: CA:true pathlen 1, URI SAN spiffe://<td>."""
    now = _now(now)
    key = key or generate_key()
    name = _ca_name(common_name, trust_domain)
    cert = (
        _ca_builder(name, name, key.public_key(), now - CLOCK_SKEW, now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=ROOT_PATH_LENGTH), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_intermediate(
    common_name: str,
    trust_domain: str,
    issuer_cert: x509.Certificate,
    issuer_key: IssuerKey,
    lifetime: timedelta = INTERMEDIATE_LIFETIME,
    *,
    now: datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 intermediate CA (pathlen 0) signed by the issuer, capped at its expiry."""
    now = _now(now)
    _check_issuer_usable(issuer_cert, now)
    key = key or generate_key()
    name = _ca_name(common_name, trust_domain)
    not_before, not_after = _window(issuer_cert, now, lifetime)
    cert = (
        _ca_builder(name, issuer_cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_aki(issuer_cert), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]
            ),
            critical=False,
        )
        .sign(issuer_key, _hash_for(issuer_key))
    )
    return cert, key


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(public_key), critical=False)
    )


# --------------------------------------------------------------------------- workloads


def make_csr(
    key: ec.EllipticCurvePrivateKey, spiffe_uri: str | None = None
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``key``, with ``spiffe_uri`` as its one URI SAN if given.

    The CA takes the identity from attestation, never from here; the SAN only lets it check
    that the requester and the attestation agree.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256())


def sign_workload(
    csr: x509.CertificateSigningRequest,
    issuer_cert: x509.Certificate,
    issuer_key: IssuerKey,
    spiffe_uri: str,
    lifetime: timedelta = WORKLOAD_LIFETIME,
    *,
    now: datetime | None = None,
    serial: int | None = None,
    workload: WorkloadName | None = None,
) -> x509.Certificate:
    """The workload certificate for the CSR's key, named ``spiffe_uri`` (the caller's decision).

    Only the CSR's public key is used: its subject and SANs are ignored. ``workload``, the
    attested compose service and version, goes in the subject (``workload_subject``): the
    peer's metrics name it from there, as Istio's metadata exchange would. ``not_before`` is
    ``now - CLOCK_SKEW``; ``not_after`` is ``now + lifetime`` capped at the issuer's expiry.
    ValueError if the key is not P-256, the lifetime is not positive, or the issuer is
    expired, not yet valid or not a CA.
    """
    now = _now(now)
    if lifetime <= timedelta(0):
        raise ValueError("the lifetime must be more than 0")
    _check_issuer_usable(issuer_cert, now)
    public_key = csr.public_key()
    check_workload_key(public_key)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    not_before, not_after = _window(issuer_cert, now, lifetime)
    return (
        x509.CertificateBuilder()
        .subject_name(workload_subject(workload))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)]),
            critical=workload is None,  # when the subject is empty (RFC 5280 4.2.1.6)
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .sign(issuer_key, _hash_for(issuer_key))
    )


def workload_subject(workload: WorkloadName | None) -> x509.Name:
    """The subject of a workload certificate: O the compose project, OU the version, CN the
    compose service (the workload), all attested; empty without them."""
    if workload is None:
        return x509.Name([])
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, workload.namespace),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, workload.version),
        x509.NameAttribute(NameOID.COMMON_NAME, workload.workload),
    ])


def _window(
    issuer_cert: x509.Certificate, now: datetime, lifetime: timedelta
) -> tuple[datetime, datetime]:
    not_before = max(now - CLOCK_SKEW, issuer_cert.not_valid_before_utc)
    not_after = min(now + lifetime, issuer_cert.not_valid_after_utc)
    return not_before, not_after


def _check_issuer_usable(issuer_cert: x509.Certificate, now: datetime) -> None:
    if not is_ca(issuer_cert):
        raise ValueError("the issuer is not a CA certificate")
    if now >= issuer_cert.not_valid_after_utc:
        raise ValueError(f"the issuer expired on {_when(issuer_cert.not_valid_after_utc)}")
    if now < issuer_cert.not_valid_before_utc - CLOCK_SKEW:
        raise ValueError(f"the issuer is not valid until {_when(issuer_cert.not_valid_before_utc)}")


# --------------------------------------------------------------------------- reading certificates


def is_ca(cert: x509.Certificate) -> bool:
    """True if basicConstraints says CA:TRUE and keyUsage (if present) allows keyCertSign."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def uri_sans(
    obj: x509.Certificate | x509.CertificateSigningRequest,
) -> tuple[list[str], int]:
    """The URI SANs of a certificate or CSR, and how many SANs of other kinds it has."""
    try:
        san = obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], 0
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris, len(san) - len(uris)


def spiffe_of(cert: x509.Certificate) -> str:
    """The certificate's one URI SAN (its SPIFFE ID); ValueError if it has none or several."""
    uris, _ = uri_sans(cert)
    if len(uris) != 1:
        raise ValueError(f"the certificate has {len(uris)} URI SANs; an SVID has exactly one")
    return uris[0]


def fingerprint(cert: x509.Certificate) -> str:
    """``SHA256:aa:bb:...``: the SHA-256 of the certificate's DER, as ``openssl x509`` shows it."""
    digest = cert.fingerprint(hashes.SHA256())
    return "SHA256:" + ":".join(f"{b:02x}" for b in digest)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate] | tuple[x509.Certificate, ...],
    roots: list[x509.Certificate] | tuple[x509.Certificate, ...],
    now: datetime | None = None,
) -> None:
    """ValueError (with the verifier's reason) unless ``leaf`` chains to one of ``roots``.

    Checks signatures, each certificate's validity window at ``now``, CA constraints
    (basicConstraints, pathlen, keyUsage) and the leaf's clientAuth EKU, with
    cryptography's path builder (RFC 5280 as the Web PKI profile reads it).
    """
    if not roots:
        raise ValueError("no trusted roots to verify against")
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(_now(now))
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise ValueError(f"the certificate does not verify: {exc}") from None


def check_root(cert: x509.Certificate, key: object, now: datetime | None = None) -> None:
    """RootError unless ``cert`` and ``key`` can act as the mesh's CA at ``now``."""
    now = _now(now)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as exc:
        raise RootError("cert", f"the certificate's extensions are malformed: {exc}") from None
    if bc is None or not bc.ca:
        raise RootError("cert", "the certificate is not a CA (basicConstraints CA:TRUE is missing)")
    if not is_ca(cert):
        raise RootError("cert", "the certificate may not sign certificates (no keyCertSign)")
    try:
        _check_issuer_key(key)
    except ValueError as exc:
        raise RootError("key", str(exc)) from None
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise RootError("key", "the key does not match the certificate's public key")
    if now >= cert.not_valid_after_utc:
        raise RootError("cert", f"the certificate expired on {_when(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        raise RootError(
            "cert", f"the certificate is not valid until {_when(cert.not_valid_before_utc)}"
        )


def load_user_root(
    cert_pem: bytes, key_pem: bytes, now: datetime | None = None
) -> tuple[x509.Certificate, IssuerKey]:
    """A user's own root from PEM; RootError (a ValueError) with one sentence saying why not.

    Refused: a certificate or key that does not parse (or an encrypted key), a certificate
    that is not a CA, a key that does not match it, one that has expired or is not yet valid.
    """
    try:
        cert = cert_from_pem(cert_pem)
    except ValueError:
        raise RootError("cert", "the file is not a PEM X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise RootError("key", "the key is encrypted; give the CA an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise RootError("key", "the file is not a PEM private key") from None
    check_root(cert, key, now)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return cert, key


def _spki(public_key: object) -> bytes:
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------- PEM


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_to_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def cert_from_pem(data: bytes | str) -> x509.Certificate:
    """The first certificate in ``data``; ValueError if there is none."""
    try:
        return x509.load_pem_x509_certificate(_bytes(data))
    except ValueError:
        raise ValueError("not a PEM X.509 certificate") from None


def certs_from_pem(data: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; ValueError if there is none or one is malformed."""
    try:
        return x509.load_pem_x509_certificates(_bytes(data))
    except ValueError:
        raise ValueError("not a PEM bundle of X.509 certificates") from None


def key_to_pem(key: IssuerKey) -> bytes:
    """PKCS#8 PEM, unencrypted (the CA's volume is where it is protected)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes | str) -> IssuerKey:
    """An unencrypted EC or RSA private key; ValueError otherwise."""
    try:
        key = serialization.load_pem_private_key(_bytes(data), password=None)
    except TypeError:
        raise ValueError("the key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"the key is {_key_kind(key)}; expected EC or RSA")
    return key


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_from_pem(data: bytes | str) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(_bytes(data))
    except ValueError:
        raise ValueError("not a PEM PKCS#10 certificate signing request") from None


def csr_signature_ok(csr: x509.CertificateSigningRequest) -> bool:
    """True if the CSR is signed by the key it carries (proof of possession)."""
    try:
        return csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data
