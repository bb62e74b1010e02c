# ruff: noqa: E402
"""Certificate signing: certificates/s of the mesh CA, against the bare cryptography it does.

    python -m bench.ca_sign [--rounds 3] [--duration 1] [--quick]

Subjects, one after the other in this process (the order rotating each round):

- ca.sign: ``CertificateAuthority.sign`` over CSRs made beforehand (each of its own P-256
  key): parse and check the CSR (its signature too), build the certificate, sign it, PEM;
- issue: what a proxy and the CA do together for one certificate: key, CSR, ca.sign;
- keygen+sign (baseline): a P-256 key generated and one ECDSA signature over as many bytes
  as a workload certificate's TBS;
- sign (baseline): one bare ECDSA P-256 signature over those bytes.

Figure: operations per second for --duration seconds per subject and round.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import itertools
import time
from collections.abc import Callable
from datetime import timedelta

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench._common import (
    Baseline,
    Metric,
    Results,
    console,
    print_header,
    print_ratio_note,
    results_table,
    rotated,
)
from composemesh.ca import CertificateAuthority, SpiffeId, csr_to_pem, generate_key, make_csr, pki

SCRIPT = "bench/ca_sign.py"
TRUST_DOMAIN = "cluster.local"
CSRS = 256  # distinct CSRs signed in turn
SUBJECTS = ("ca.sign", "issue", "keygen+sign", "sign")
METRICS = (Metric("rate", "signed/s"),)
BASELINES = (Baseline("keygen+sign", "÷ keygen+sign"), Baseline("sign", "÷ bare sign"))


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second, for ``seconds``."""
    n = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def workloads() -> dict[str, Callable[[], object]]:
    """Each subject as one call; the CA, its CSRs and the TBS bytes made here, beforehand."""
    root, root_key = pki.make_root("bench root", TRUST_DOMAIN)
    ca = CertificateAuthority(root, root_key, TRUST_DOMAIN, timedelta(hours=24))
    identity = SpiffeId(TRUST_DOMAIN, "bench", "reviews")
    csrs = [csr_to_pem(make_csr(generate_key(), identity.uri)) for _ in range(CSRS)]
    tbs = pki.cert_from_pem(ca.sign(csrs[0], identity).cert_pem).tbs_certificate_bytes
    next_csr = itertools.cycle(csrs).__next__
    signer = ec.generate_private_key(ec.SECP256R1())
    ecdsa = ec.ECDSA(hashes.SHA256())

    def issue() -> object:
        return ca.sign(csr_to_pem(make_csr(generate_key(), identity.uri)), identity)

    return {
        "ca.sign": lambda: ca.sign(next_csr(), identity),
        "issue": issue,
        "keygen+sign": lambda: ec.generate_private_key(ec.SECP256R1()).sign(tbs, ecdsa),
        "sign": lambda: signer.sign(tbs, ecdsa),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds per subject and round (default 1; quick 0.25)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.duration is None:
        args.duration = 0.25 if args.quick else 1.0
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds and --duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = console()
    calls = workloads()
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s) of {args.duration:g} s per subject; P-256 keys, "
        f"ECDSA-SHA256; ca.sign over {CSRS} CSRs made beforehand",
    ])
    results: Results = {}
    for round_no in range(args.rounds):
        for subject in rotated(SUBJECTS, round_no):
            results.setdefault(("rate", subject), []).append(rate(calls[subject], args.duration))
    out.print(results_table("Certificate signing, one thread (medians)", METRICS, SUBJECTS,
                            results, BASELINES))
    print_ratio_note(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
