"""Renewal at half-life and the root rotation state machine, each step checked."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from composemesh.ca import pki
from composemesh.ca.rotation import (
    Root,
    RootSet,
    RotationError,
    begin_rotation,
    finish_after,
    finish_rotation,
    needs_renewal,
    renew_at,
    steady,
    switch_signing,
)
from composemesh.errors import MeshError
from tests.ca.support import NOW, REVIEWS, TD

RootPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
DAY = timedelta(days=1)


# --------------------------------------------------------------------------- renewal


def test_renew_at_half_life() -> None:
    assert renew_at(NOW, NOW + DAY) == NOW + timedelta(hours=12)
    assert renew_at(NOW, NOW + DAY, fraction=0.8) == NOW + timedelta(hours=19, minutes=12)


def test_renew_at_jitter_stays_in_its_band() -> None:
    rng = random.Random(7)
    times = [renew_at(NOW, NOW + DAY, jitter=0.1, rng=rng) for _ in range(200)]
    low, high = NOW + timedelta(hours=12 - 2.4), NOW + timedelta(hours=12 + 2.4)
    assert all(low <= t <= high for t in times)
    assert len(set(times)) > 150  # actually spread
    assert min(times) < NOW + timedelta(hours=11) and max(times) > NOW + timedelta(hours=13)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"not_after": NOW}, "window is empty"),
        ({"not_after": NOW - DAY}, "window is empty"),
        ({"fraction": 0.0}, "not between 0 and 1"),
        ({"fraction": 1.0}, "not between 0 and 1"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 0.5}, "jitter"),
        ({"fraction": 0.9, "jitter": 0.1}, "jitter"),
    ],
)
def test_renew_at_refuses(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"not_before": NOW, "not_after": NOW + DAY, **kwargs}
    with pytest.raises(ValueError, match=reason):
        renew_at(**args)  # type: ignore[arg-type]


def test_needs_renewal(root: RootPair) -> None:
    leaf = pki.sign_workload(
        pki.make_csr(pki.generate_key()), root[0], root[1], REVIEWS, DAY, now=NOW
    )
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    half = start + (end - start) / 2
    assert not needs_renewal(leaf, NOW)
    assert not needs_renewal(leaf, half - timedelta(seconds=1))
    assert needs_renewal(leaf, half)
    assert needs_renewal(leaf, end + timedelta(hours=1))  # expired
    assert not needs_renewal(leaf, start - timedelta(hours=1))  # our clock is behind
    assert needs_renewal(leaf, NOW + timedelta(hours=20), fraction=0.8)
    assert not needs_renewal(leaf, NOW + timedelta(hours=18), fraction=0.8)


# --------------------------------------------------------------------------- root rotation


@pytest.fixture
def old(root: RootPair) -> Root:
    return Root(*root)


@pytest.fixture
def new() -> Root:
    return Root(*pki.make_root("new root", TD, now=NOW))


def test_full_rotation(old: Root, new: Root) -> None:
    s0 = steady(old)
    assert (s0.phase, s0.active, s0.trusted, s0.incoming) == ("steady", old, (old.cert,), None)

    s1 = begin_rotation(s0, new, NOW)
    assert s1.phase == "trusting"
    assert s1.active == old  # still signs with the old root
    assert s1.trusted == (old.cert, new.cert)
    assert s1.incoming == new
    assert pki.certs_from_pem(s1.bundle_pem) == [old.cert, new.cert]

    s2 = switch_signing(s1)
    assert s2.phase == "switched"
    assert s2.active == new
    assert s2.trusted == (old.cert, new.cert)
    assert s2.incoming is None

    s3 = finish_rotation(s2)
    assert s3.phase == "steady"
    assert s3.active == new
    assert s3.trusted == (new.cert,)
    assert s0.trusted == (old.cert,)  # values, not mutation


def test_steps_out_of_order(old: Root, new: Root) -> None:
    s0 = steady(old)
    with pytest.raises(RotationError, match="begin the rotation first"):
        switch_signing(s0)
    with pytest.raises(RotationError, match="switch signing first"):
        finish_rotation(s0)
    s1 = begin_rotation(s0, new, NOW)
    with pytest.raises(RotationError, match="switch signing first"):
        finish_rotation(s1)
    with pytest.raises(RotationError, match="already under way"):
        begin_rotation(s1, new, NOW)
    s2 = switch_signing(s1)
    with pytest.raises(RotationError, match="begin the rotation first"):
        switch_signing(s2)
    with pytest.raises(RotationError, match="already under way"):
        begin_rotation(s2, Root(*pki.make_root("third", TD, now=NOW)), NOW)
    assert isinstance(RotationError("x"), MeshError)


def test_begin_refuses_unusable_roots(old: Root, new: Root, root: RootPair) -> None:
    s0 = steady(old)
    with pytest.raises(RotationError, match="already in use"):
        begin_rotation(s0, old, NOW)
    with pytest.raises(RotationError, match="does not match"):
        begin_rotation(s0, Root(new.cert, pki.generate_key()), NOW)
    with pytest.raises(RotationError, match="expired"):
        begin_rotation(s0, new, NOW + timedelta(days=4000))
    key = pki.generate_key()
    leaf = pki.sign_workload(pki.make_csr(key), root[0], root[1], REVIEWS, now=NOW)
    with pytest.raises(RotationError, match="not a CA"):
        begin_rotation(s0, Root(leaf, key), NOW)


def test_inconsistent_root_sets_are_refused(old: Root, new: Root) -> None:
    with pytest.raises(RotationError, match="inconsistent"):
        RootSet(active=old, trusted=(new.cert,))
    with pytest.raises(RotationError, match="inconsistent"):
        RootSet(active=old, trusted=(old.cert, new.cert))  # steady trusts one root
    with pytest.raises(RotationError, match="inconsistent"):
        RootSet(active=old, trusted=(old.cert,), phase="trusting")
    with pytest.raises(RotationError, match="inconsistent"):
        RootSet(active=old, trusted=(new.cert, old.cert), phase="switched", incoming=new)


def test_finish_after() -> None:
    assert finish_after(NOW, DAY) == NOW + DAY + timedelta(minutes=1)
