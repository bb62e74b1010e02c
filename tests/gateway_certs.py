"""Certificates for the gateway tests, made with cryptography into a directory: a CA, server
certificates signed by it (one per host), an expired one, a key that matches none, a non-CA."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NOW = datetime.now(UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass
class Authority:
    """A CA that signs server certificates into ``directory``."""

    directory: Path
    name: str = "Test CA"
    ca: bool | None = True  # None: no basicConstraints at all

    def __post_init__(self) -> None:
        self.key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
        )
        if self.ca is not None:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=self.ca, path_length=None), critical=True
            )
        self.cert = builder.sign(self.key, hashes.SHA256())
        slug = self.name.lower().replace(" ", "-")
        self.path = _write_cert(self.directory / f"{slug}.pem", self.cert)

    def server(
        self, host: str, *, expired: bool = False, stem: str | None = None
    ) -> tuple[Path, Path]:
        """A certificate for ``host`` signed by this CA and its key: (cert path, key path)."""
        key = _key()
        start = NOW - timedelta(days=10 if expired else 1)
        end = NOW - timedelta(days=1) if expired else NOW + timedelta(days=30)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(_name(self.name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        stem = stem or host
        return (
            _write_cert(self.directory / f"{stem}.crt", cert),
            _write_key(self.directory / f"{stem}.key", key),
        )


def stray_key(path: Path) -> Path:
    """A private key that matches no certificate."""
    return _write_key(path, _key())
