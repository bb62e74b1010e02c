"""The authority signs for the attested identity only, and refuses everything else with a reason."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from composemesh.ca import (
    CertificateAuthority,
    IssuanceRefused,
    Root,
    SpiffeId,
    begin_rotation,
    check_user_root,
    finish_rotation,
    pki,
    switch_signing,
)
from composemesh.errors import ConfigError, MeshError
from composemesh.model.ca_config import CAConfig, parse_ca_config
from tests.ca.support import NOW, REVIEWS, TD

RootPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
REVIEWS_ID = SpiffeId(TD, "shop", "reviews")


class Clock:
    """A settable clock (the authority's only notion of time)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def ca(root: RootPair, clock: Clock) -> CertificateAuthority:
    return CertificateAuthority(root[0], root[1], TD, timedelta(hours=1), clock)


def csr_pem(uri: str | None = None, key: object = None) -> bytes:
    key = key or pki.generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def refused(ca: CertificateAuthority, pem: bytes, attested: SpiffeId = REVIEWS_ID) -> str:
    with pytest.raises(IssuanceRefused) as info:
        ca.sign(pem, attested)
    assert isinstance(info.value, MeshError)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_sign_with_and_without_san(ca: CertificateAuthority, root: RootPair) -> None:
    for pem in (csr_pem(REVIEWS), csr_pem(None), csr_pem(REVIEWS).decode()):
        signed = ca.sign(pem, REVIEWS_ID)
        cert = pki.cert_from_pem(signed.cert_pem)
        assert pki.spiffe_of(cert) == REVIEWS
        assert signed.spiffe == REVIEWS_ID
        assert signed.not_after == cert.not_valid_after_utc == NOW + timedelta(hours=1)
        assert pki.certs_from_pem(signed.chain_pem) == [cert, root[0]]
        pki.verify_chain(cert, [], pki.certs_from_pem(ca.trust_bundle()), NOW)
    assert ca.signed == 3


def test_refuses_another_identity_in_the_csr(ca: CertificateAuthority) -> None:
    reason = refused(ca, csr_pem("spiffe://cluster.local/ns/shop/sa/ratings"))
    assert reason == (
        "the CSR asks for spiffe://cluster.local/ns/shop/sa/ratings but the caller was "
        "attested as spiffe://cluster.local/ns/shop/sa/reviews"
    )
    assert ca.signed == 0


def test_refuses_other_names_in_the_csr(ca: CertificateAuthority) -> None:
    key = pki.generate_key()
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(REVIEWS), x509.DNSName("reviews")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    assert "DNS, IP or other names" in refused(ca, pem)


def test_refuses_another_trust_domain(ca: CertificateAuthority) -> None:
    other = SpiffeId("evil.example", "shop", "reviews")
    reason = refused(ca, csr_pem(None), other)
    assert "trust domain 'evil.example'; this CA signs for 'cluster.local'" in reason


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a csr",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 20000 + b"\n",
    ],
)
def test_refuses_malformed_pem(ca: CertificateAuthority, pem: bytes) -> None:
    reason = refused(ca, pem)
    assert "malformed" in reason or "larger than" in reason


def _tamper(pem: bytes, index: int) -> bytes:
    body = re.sub(rb"-----[A-Z ]+-----|\s", b"", pem)
    der = bytearray(base64.b64decode(body))
    der[index] ^= 0x01
    b64 = base64.encodebytes(bytes(der))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + b64 + b"-----END CERTIFICATE REQUEST-----\n"


def test_refuses_bad_signature(ca: CertificateAuthority) -> None:
    pem = csr_pem(REVIEWS)
    assert ca.sign(_tamper(_tamper(pem, -1), -1), REVIEWS_ID)  # the helper round-trips
    reason = refused(ca, _tamper(pem, -1))  # a byte of the signature
    assert reason == "the CSR's signature does not verify with its own key"
    # a byte of the signed content: the SAN's URI now reads .../sa/reviewr
    der_index = base64.b64decode(re.sub(rb"-----[A-Z ]+-----|\s", b"", pem)).rfind(b"reviews")
    assert "does not verify" in refused(ca, _tamper(pem, der_index + 6))


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            rsa.generate_private_key(65537, 2048),
            "the key is RSA-2048; workload keys must be ECDSA P-256",
        ),
        (
            ec.generate_private_key(ec.SECP384R1()),
            "the EC key is on secp384r1; workload keys must be P-256",
        ),
        (ec.generate_private_key(ec.SECP224R1()), "the EC key on secp224r1 is too weak (224 bits)"),
        (
            ed25519.Ed25519PrivateKey.generate(),
            "the key is Ed25519; workload keys must be ECDSA P-256",
        ),
    ],
)
def test_refuses_other_keys(ca: CertificateAuthority, key: object, reason: str) -> None:
    assert refused(ca, csr_pem(REVIEWS, key)) == reason


def test_lifetime_capped_by_root(clock: Clock, root: RootPair) -> None:
    ca = CertificateAuthority(root[0], root[1], TD, timedelta(days=30), clock)
    clock.now = root[0].not_valid_after_utc - timedelta(days=1)
    assert ca.sign(csr_pem(), REVIEWS_ID).not_after == root[0].not_valid_after_utc
    clock.now = root[0].not_valid_after_utc
    assert "the issuer expired" in refused(ca, csr_pem())


def test_constructor_validates() -> None:
    cert, key = pki.make_root("r", TD, now=NOW)
    with pytest.raises(ValueError, match="TTL"):
        CertificateAuthority(cert, key, TD, timedelta(0))
    with pytest.raises(ValueError, match="trust domain"):
        CertificateAuthority(cert, key, "Bad Domain", timedelta(hours=1))


def test_root_rotation_keeps_every_certificate_verifiable(
    ca: CertificateAuthority, root: RootPair, clock: Clock
) -> None:
    old_leaf = pki.cert_from_pem(ca.sign(csr_pem(), REVIEWS_ID).cert_pem)
    new_cert, new_key = pki.make_root("new root", TD, now=NOW)

    ca.use_roots(begin_rotation(ca.roots, Root(new_cert, new_key), NOW))
    bundle = pki.certs_from_pem(ca.trust_bundle())
    assert bundle == [root[0], new_cert]
    still_old = pki.cert_from_pem(ca.sign(csr_pem(), REVIEWS_ID).cert_pem)
    still_old.verify_directly_issued_by(root[0])

    ca.use_roots(switch_signing(ca.roots))
    assert pki.certs_from_pem(ca.trust_bundle()) == bundle
    signed = ca.sign(csr_pem(), REVIEWS_ID)
    new_leaf = pki.cert_from_pem(signed.cert_pem)
    new_leaf.verify_directly_issued_by(new_cert)
    assert pki.certs_from_pem(signed.chain_pem)[1] == new_cert
    for leaf in (old_leaf, still_old, new_leaf):  # both generations verify against the bundle
        pki.verify_chain(leaf, [], bundle, NOW)

    ca.use_roots(finish_rotation(ca.roots))
    final = pki.certs_from_pem(ca.trust_bundle())
    assert final == [new_cert]
    pki.verify_chain(new_leaf, [], final, NOW)
    with pytest.raises(ValueError):
        pki.verify_chain(old_leaf, [], final, NOW)
    assert ca.signed == 3


# --------------------------------------------------------------------------- user root from config


def _write_root(tmp_path: Path, cert: x509.Certificate, key: object) -> CAConfig:
    (tmp_path / "certs").mkdir(exist_ok=True)
    (tmp_path / "certs" / "root.pem").write_bytes(pki.cert_to_pem(cert))
    (tmp_path / "certs" / "root-key.pem").write_bytes(pki.key_to_pem(key))  # type: ignore[arg-type]
    return parse_ca_config(
        {"root": {"cert": "certs/root.pem", "key": "certs/root-key.pem"}}, tmp_path
    )


def test_check_user_root_loads_the_files(tmp_path: Path, root: RootPair) -> None:
    config = _write_root(tmp_path, *root)
    loaded = check_user_root(config, NOW)
    assert loaded is not None and loaded.cert == root[0]
    assert check_user_root(CAConfig(), NOW) is None


@pytest.mark.parametrize(
    ("when", "field", "reason"),
    [
        (NOW + timedelta(days=3651), "x-composemesh.mtls.root.cert", "the certificate expired on"),
        (NOW - timedelta(days=1), "x-composemesh.mtls.root.cert", "is not valid until"),
    ],
)
def test_check_user_root_window(
    tmp_path: Path, root: RootPair, when: datetime, field: str, reason: str
) -> None:
    config = _write_root(tmp_path, *root)
    with pytest.raises(ConfigError) as info:
        check_user_root(config, when)
    assert info.value.field == field
    assert reason in info.value.message
    assert str(tmp_path / "certs" / "root.pem") in info.value.message


def test_check_user_root_mismatch_and_not_a_ca(tmp_path: Path, root: RootPair) -> None:
    config = _write_root(tmp_path, root[0], pki.generate_key())
    with pytest.raises(ConfigError) as info:
        check_user_root(config, NOW)
    assert info.value.field == "x-composemesh.mtls.root.key"
    assert "does not match" in str(info.value)

    key = pki.generate_key()
    leaf = pki.sign_workload(pki.make_csr(key), root[0], root[1], REVIEWS, now=NOW)
    config = _write_root(tmp_path, leaf, key)
    with pytest.raises(ConfigError) as info:
        check_user_root(config, NOW)
    assert info.value.field == "x-composemesh.mtls.root.cert"
    assert "is not a CA" in str(info.value)


def test_check_user_root_unreadable(tmp_path: Path, root: RootPair) -> None:
    config = _write_root(tmp_path, *root)
    (tmp_path / "certs" / "root.pem").unlink()
    with pytest.raises(ConfigError) as info:
        check_user_root(config, NOW)
    assert info.value.field == "x-composemesh.mtls.root.cert"
    assert "cannot read" in str(info.value) and "No such file" in str(info.value)
    (tmp_path / "certs" / "root.pem").write_bytes(b"junk")
    with pytest.raises(ConfigError) as info:
        check_user_root(config, NOW)
    assert info.value.field == "x-composemesh.mtls.root.cert"
    assert "not a PEM X.509 certificate" in str(info.value)
