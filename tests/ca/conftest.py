"""Fixtures of the CA tests: one root per test module, made at the fixed NOW."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from composemesh.ca import pki
from tests.ca.support import NOW, TD


@pytest.fixture(scope="module")
def root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return pki.make_root("composemesh root", TD, now=NOW)
