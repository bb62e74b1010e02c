"""How fast the CA signs, printed (not asserted): run with ``-s``, or run this file directly.

Compared with a baseline of the same cryptographic work done bare: a P-256 key generated and
one ECDSA signature over as many bytes as a workload certificate's TBS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from composemesh.ca import CertificateAuthority, SpiffeId, csr_to_pem, generate_key, make_csr, pki

TD = "cluster.local"
BUDGET_S = 0.25


def _rate(fn: Callable[[], object], budget_s: float = BUDGET_S) -> float:
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s:
        fn()
        n += 1
    return n / elapsed


def measure(budget_s: float = BUDGET_S) -> dict[str, float]:
    root, root_key = pki.make_root("bench root", TD)
    ca = CertificateAuthority(root, root_key, TD, timedelta(hours=24))
    identity = SpiffeId(TD, "bench", "reviews")
    csr = csr_to_pem(make_csr(generate_key(), identity.uri))
    tbs = pki.cert_from_pem(ca.sign(csr, identity).cert_pem).tbs_certificate_bytes

    def issue() -> None:  # what a proxy and the CA do together: key, CSR, sign
        ca.sign(csr_to_pem(make_csr(generate_key(), identity.uri)), identity)

    def baseline() -> None:
        ec.generate_private_key(ec.SECP256R1()).sign(tbs, ec.ECDSA(hashes.SHA256()))

    signer = ec.generate_private_key(ec.SECP256R1())
    before = ca.signed
    rates = {
        "ca_sign_per_s": _rate(lambda: ca.sign(csr, identity), budget_s),
        "issue_per_s": _rate(issue, budget_s),
        "baseline_keygen_sign_per_s": _rate(baseline, budget_s),
        "baseline_sign_per_s": _rate(lambda: signer.sign(tbs, ec.ECDSA(hashes.SHA256())), budget_s),
    }
    rates["signed"] = float(ca.signed - before)
    return rates


def report(rates: dict[str, float]) -> str:
    return (
        f"CA sign (parse+check CSR, build, sign): {rates['ca_sign_per_s']:.0f}/s; "
        f"full issue (keygen+CSR+sign): {rates['issue_per_s']:.0f}/s; "
        f"baseline keygen+ECDSA sign: {rates['baseline_keygen_sign_per_s']:.0f}/s "
        f"(CA sign = {rates['ca_sign_per_s'] / rates['baseline_keygen_sign_per_s']:.2f}x); "
        f"bare ECDSA sign: {rates['baseline_sign_per_s']:.0f}/s "
        f"(CA sign = {rates['ca_sign_per_s'] / rates['baseline_sign_per_s']:.2f}x)"
    )


def test_signing_rate() -> None:
    rates = measure()
    print("\n" + report(rates))
    assert rates["signed"] > 0  # the loop ran, and the authority counted it
    assert all(rate > 0 for rate in rates.values()), rates  # every loop ran at least once


if __name__ == "__main__":
    print(report(measure(2.0)))
