"""Certificate building and checking: roots, CSRs, workload leaves, chains, user roots."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from composemesh.ca import pki
from composemesh.model.ca_config import DEFAULT_WORKLOAD_TTL_S
from tests.ca.support import NOW, REVIEWS, TD

Root = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def leaf_for(root: Root, uri: str = REVIEWS, **kw: object) -> x509.Certificate:
    csr = pki.make_csr(pki.generate_key(), uri)
    return pki.sign_workload(csr, root[0], root[1], uri, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


# --------------------------------------------------------------------------- root


def test_root_properties(root: Root) -> None:
    cert, key = root
    assert isinstance(key.curve, ec.SECP256R1)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://cluster.local"]
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "composemesh root"
    assert cert.not_valid_before_utc == NOW - pki.CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + pki.ROOT_LIFETIME
    cert.verify_directly_issued_by(cert)  # self-signed


def test_defaults_agree_with_model() -> None:
    assert timedelta(seconds=DEFAULT_WORKLOAD_TTL_S) == pki.WORKLOAD_LIFETIME


# --------------------------------------------------------------------------- leaf


def test_sign_and_verify(root: Root) -> None:
    leaf = leaf_for(root)
    pki.verify_chain(leaf, [], [root[0]], NOW)
    leaf.verify_directly_issued_by(root[0])


def test_leaf_properties(root: Root) -> None:
    key = pki.generate_key()
    csr = pki.make_csr(key, None)
    leaf = pki.sign_workload(csr, root[0], root[1], REVIEWS, timedelta(hours=2), now=NOW, serial=42)
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert leaf.serial_number == 42
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(REVIEWS)]
    assert pki.spiffe_of(leaf) == REVIEWS
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root[0].subject
    ski = ext(root[0], x509.SubjectKeyIdentifier).value.digest
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert ext(leaf, x509.SubjectKeyIdentifier).value.digest
    assert leaf.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=2)


def test_san_comes_from_the_caller_not_the_csr(root: Root) -> None:
    csr = pki.make_csr(pki.generate_key(), "spiffe://cluster.local/ns/shop/sa/admin")
    leaf = pki.sign_workload(csr, root[0], root[1], REVIEWS, now=NOW)
    assert pki.spiffe_of(leaf) == REVIEWS


def test_lifetime_capped_by_issuer(root: Root) -> None:
    near_end = root[0].not_valid_after_utc - timedelta(hours=1)
    leaf = leaf_for(root, now=near_end)
    assert leaf.not_valid_after_utc == root[0].not_valid_after_utc


def test_not_before_never_precedes_issuer() -> None:
    cert, key = pki.make_root("r", TD, now=NOW)  # valid from NOW - 1 min
    leaf = leaf_for((cert, key), now=NOW - timedelta(seconds=30))  # NOW - 90 s, back-dated
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert leaf.not_valid_before_utc == cert.not_valid_before_utc


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (rsa.generate_private_key(65537, 2048), "RSA-2048; workload keys must be ECDSA P-256"),
        (ec.generate_private_key(ec.SECP384R1()), "secp384r1; workload keys must be P-256"),
    ],
)
def test_sign_refuses_other_keys(root: Root, key: object, reason: str) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    with pytest.raises(ValueError, match=reason):
        pki.sign_workload(csr, root[0], root[1], REVIEWS, now=NOW)


def test_sign_refuses_expired_issuer_and_non_ca(root: Root) -> None:
    csr = pki.make_csr(pki.generate_key())
    with pytest.raises(ValueError, match="the issuer expired"):
        pki.sign_workload(csr, root[0], root[1], REVIEWS, now=root[0].not_valid_after_utc)
    with pytest.raises(ValueError, match="not valid until"):
        pki.sign_workload(csr, root[0], root[1], REVIEWS, now=NOW - timedelta(days=1))
    leaf_key = pki.generate_key()
    leaf = pki.sign_workload(pki.make_csr(leaf_key), root[0], root[1], REVIEWS, now=NOW)
    with pytest.raises(ValueError, match="not a CA"):
        pki.sign_workload(csr, leaf, leaf_key, REVIEWS, now=NOW)
    with pytest.raises(ValueError, match="lifetime must be more than 0"):
        pki.sign_workload(csr, root[0], root[1], REVIEWS, timedelta(0), now=NOW)


def test_spiffe_of_needs_exactly_one_uri(root: Root) -> None:
    with pytest.raises(ValueError, match="0 URI SANs"):
        pki.spiffe_of(_self_signed(sans=[x509.DNSName("a.example")]))
    two = [x509.UniformResourceIdentifier(REVIEWS), x509.UniformResourceIdentifier(REVIEWS + "2")]
    with pytest.raises(ValueError, match="2 URI SANs"):
        pki.spiffe_of(_self_signed(sans=two))
    with pytest.raises(ValueError, match="0 URI SANs"):
        pki.spiffe_of(_self_signed(sans=None))


def _self_signed(sans: Sequence[x509.GeneralName] | None) -> x509.Certificate:
    key = pki.generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


# --------------------------------------------------------------------------- chains


def test_verify_chain_with_intermediate(root: Root) -> None:
    inter, inter_key = pki.make_intermediate("inter", TD, root[0], root[1], now=NOW)
    assert ext(inter, x509.BasicConstraints).value.path_length == 0
    leaf = leaf_for((inter, inter_key))
    pki.verify_chain(leaf, [inter], [root[0]], NOW)
    with pytest.raises(ValueError, match="does not verify"):
        pki.verify_chain(leaf, [], [root[0]], NOW)  # the intermediate is missing


def test_verify_chain_refusals(root: Root) -> None:
    leaf = leaf_for(root)
    other, _ = pki.make_root("other", TD, now=NOW)
    with pytest.raises(ValueError, match="does not verify"):
        pki.verify_chain(leaf, [], [other], NOW)
    with pytest.raises(ValueError, match="not valid at validation time"):
        pki.verify_chain(leaf, [], [root[0]], NOW + timedelta(days=2))
    with pytest.raises(ValueError, match="not valid at validation time"):
        pki.verify_chain(leaf, [], [root[0]], NOW - timedelta(minutes=5))
    with pytest.raises(ValueError, match="no trusted roots"):
        pki.verify_chain(leaf, [], [], NOW)
    # a leaf cannot act as a CA for another leaf
    leaf_key = pki.generate_key()
    leaf2 = pki.sign_workload(pki.make_csr(leaf_key), root[0], root[1], REVIEWS, now=NOW)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(leaf2.subject)
        .public_key(pki.generate_key().public_key())
        .serial_number(7)
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(REVIEWS)]), critical=True
        )
        .sign(leaf_key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="does not verify"):
        pki.verify_chain(forged, [leaf2], [root[0]], NOW)


def test_tampered_leaf_does_not_verify(root: Root) -> None:
    der = bytearray(leaf_for(root).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(ValueError, match="does not verify"):
        pki.verify_chain(tampered, [], [root[0]], NOW)


# --------------------------------------------------------------------------- PEM, fingerprints


def test_pem_round_trips(root: Root) -> None:
    cert, key = root
    assert pki.cert_from_pem(pki.cert_to_pem(cert)) == cert
    assert pki.cert_from_pem(pki.cert_to_pem(cert).decode()) == cert
    leaf = leaf_for(root)
    assert pki.certs_from_pem(pki.certs_to_pem([leaf, cert])) == [leaf, cert]
    again = pki.key_from_pem(pki.key_to_pem(key))
    assert isinstance(again, ec.EllipticCurvePrivateKey)
    assert again.private_numbers() == key.private_numbers()
    csr = pki.make_csr(pki.generate_key(), REVIEWS)
    assert pki.csr_from_pem(pki.csr_to_pem(csr)) == csr
    for decode in (pki.cert_from_pem, pki.certs_from_pem, pki.key_from_pem, pki.csr_from_pem):
        with pytest.raises(ValueError):
            decode(b"-----BEGIN NOTHING-----\n-----END NOTHING-----\n")


def test_fingerprint(root: Root) -> None:
    fp = pki.fingerprint(root[0])
    assert fp.startswith("SHA256:")
    parts = fp.removeprefix("SHA256:").split(":")
    assert len(parts) == 32 and all(len(p) == 2 and p == p.lower() for p in parts)
    assert bytes.fromhex("".join(parts)) == root[0].fingerprint(hashes.SHA256())
    assert pki.fingerprint(leaf_for(root)) != fp


# --------------------------------------------------------------------------- user roots


def pem(cert: x509.Certificate, key: object) -> tuple[bytes, bytes]:
    return pki.cert_to_pem(cert), pki.key_to_pem(key)  # type: ignore[arg-type]


def test_user_root_accepted(root: Root) -> None:
    cert, key = pki.load_user_root(*pem(*root), now=NOW)
    assert cert == root[0]
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_user_rsa_root_signs_p256_leaves() -> None:
    key = rsa.generate_private_key(65537, 2048)
    cert = _ca(key, ca=True)
    loaded, loaded_key = pki.load_user_root(*pem(cert, key), now=NOW)
    assert isinstance(loaded_key, rsa.RSAPrivateKey)
    leaf = leaf_for((loaded, loaded_key))  # type: ignore[arg-type]
    pki.verify_chain(leaf, [], [loaded], NOW)


def _ca(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca: bool | None,
    start: timedelta = timedelta(days=-1),
    end: timedelta = timedelta(days=365),
    key_cert_sign: bool = True,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "user root")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(99)
        .not_valid_before(NOW + start)
        .not_valid_after(NOW + end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("make", "part", "reason"),
    [
        (lambda k: _ca(k, ca=True, end=timedelta(seconds=-1)), "cert", "expired on 2030-06-01"),
        (lambda k: _ca(k, ca=True, start=timedelta(days=2)), "cert", "not valid until 2030-06-03"),
        (lambda k: _ca(k, ca=False), "cert", "is not a CA"),
        (lambda k: _ca(k, ca=None), "cert", "is not a CA"),
        (lambda k: _ca(k, ca=True, key_cert_sign=False), "cert", "may not sign certificates"),
    ],
)
def test_user_root_refused(make: object, part: str, reason: str) -> None:
    key = pki.generate_key()
    cert = make(key)  # type: ignore[operator]
    with pytest.raises(pki.RootError, match=reason) as info:
        pki.load_user_root(*pem(cert, key), now=NOW)
    assert info.value.part == part


def test_user_root_key_mismatch(root: Root) -> None:
    cert_pem = pki.cert_to_pem(root[0])
    with pytest.raises(pki.RootError, match="does not match") as info:
        pki.load_user_root(cert_pem, pki.key_to_pem(pki.generate_key()), now=NOW)
    assert info.value.part == "key"


def test_user_root_unparsable_files(root: Root) -> None:
    cert_pem, key_pem = pem(*root)
    with pytest.raises(pki.RootError, match="not a PEM X.509 certificate") as info:
        pki.load_user_root(b"garbage", key_pem, now=NOW)
    assert info.value.part == "cert"
    with pytest.raises(pki.RootError, match="not a PEM private key") as info:
        pki.load_user_root(cert_pem, b"garbage", now=NOW)
    assert info.value.part == "key"
    encrypted = root[1].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(pki.RootError, match="encrypted") as info:
        pki.load_user_root(cert_pem, encrypted, now=NOW)
    assert info.value.part == "key"


def test_user_root_weak_rsa_key() -> None:
    key = rsa.generate_private_key(65537, 1024)
    with pytest.raises(pki.RootError, match="1024 bits") as info:
        pki.load_user_root(*pem(_ca(key, ca=True), key), now=NOW)
    assert info.value.part == "key"
