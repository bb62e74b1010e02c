"""When certificates rotate: workload renewal at half-life, and root rotation as a state machine.

Pure: frozen values in, frozen values out, no clock of its own. Root rotation goes through
three steps so that no connection ever meets a certificate its peer does not trust::

    steady(old)  --begin_rotation(new)-->  trusting   trust old+new, sign with old
                 --switch_signing-->       switched   trust old+new, sign with new
                 --finish_rotation-->      steady(new) trust new only

Between begin and switch, every proxy must receive the bundle with both roots; between
switch and finish, every certificate the old root signed must expire (``finish_after``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509

from composemesh.ca import pki
from composemesh.errors import MeshError

RENEW_FRACTION = 0.5  # renew at half-life, like Istio's SECRET_GRACE_PERIOD_RATIO
RENEW_JITTER = 0.1  # callers that renew many certificates at once spread them by this much

Phase = Literal["steady", "trusting", "switched"]


class RotationError(MeshError):
    """A root rotation step taken out of order or with a root that cannot serve."""


@dataclass(frozen=True)
class Root:
    """A CA certificate and its private key."""

    cert: x509.Certificate
    key: pki.IssuerKey


@dataclass(frozen=True)
class RootSet:
    """Which root signs and which roots are trusted (the trust bundle), at one rotation step.

    ``incoming`` is the new root while it is trusted but not yet signing (phase trusting).
    """

    active: Root
    trusted: tuple[x509.Certificate, ...]
    incoming: Root | None = None
    phase: Phase = "steady"

    def __post_init__(self) -> None:
        active = self.active.cert
        if self.phase == "steady":
            ok = self.incoming is None and self.trusted == (active,)
        elif self.phase == "trusting":
            ok = self.incoming is not None and self.trusted == (active, self.incoming.cert)
        elif self.phase == "switched":
            ok = self.incoming is None and len(self.trusted) == 2 and self.trusted[1] == active
        else:
            ok = False
        if not ok:
            raise RotationError(f"inconsistent root set for phase {self.phase!r}")

    @property
    def bundle_pem(self) -> bytes:
        """The trusted roots, PEM, in order (old first during a rotation)."""
        return pki.certs_to_pem(self.trusted)


def steady(root: Root) -> RootSet:
    """One root that signs and is the only one trusted."""
    return RootSet(active=root, trusted=(root.cert,))


def begin_rotation(rootset: RootSet, new_root: Root, now: datetime | None = None) -> RootSet:
    """Trust ``new_root`` beside the active one; keep signing with the active one.

    RotationError if a rotation is under way, or ``new_root`` is the active root, is not a
    CA, does not match its key, or is not valid at ``now`` (default: the system clock).
    """
    if rootset.phase != "steady":
        raise RotationError(f"a rotation is already under way (phase {rootset.phase})")
    if new_root.cert == rootset.active.cert:
        raise RotationError("the new root is the root already in use")
    try:
        pki.check_root(new_root.cert, new_root.key, now)
    except ValueError as exc:
        raise RotationError(f"the new root cannot serve: {exc}") from None
    return RootSet(
        active=rootset.active,
        trusted=(rootset.active.cert, new_root.cert),
        incoming=new_root,
        phase="trusting",
    )


def switch_signing(rootset: RootSet) -> RootSet:
    """Sign with the new root; still trust both (certificates of the old one are still out)."""
    if rootset.phase != "trusting" or rootset.incoming is None:
        raise RotationError(
            f"cannot switch signing in phase {rootset.phase}: begin the rotation first"
        )
    return replace(rootset, active=rootset.incoming, incoming=None, phase="switched")


def finish_rotation(rootset: RootSet) -> RootSet:
    """Trust only the new root (call once every certificate of the old one has expired)."""
    if rootset.phase != "switched":
        raise RotationError(
            f"cannot finish the rotation in phase {rootset.phase}: switch signing first"
        )
    return steady(rootset.active)


def finish_after(switched_at: datetime, workload_ttl: timedelta) -> datetime:
    """The earliest safe time to finish: the last certificate of the old root has expired."""
    return switched_at + workload_ttl + pki.CLOCK_SKEW


# --------------------------------------------------------------------------- workload renewal


def renew_at(
    not_before: datetime,
    not_after: datetime,
    fraction: float = RENEW_FRACTION,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> datetime:
    """When to renew a certificate valid from ``not_before`` to ``not_after``.

    At ``fraction`` of its lifetime, moved by up to ``jitter`` (a fraction of the lifetime)
    either way, drawn from ``rng`` (default: the ``random`` module), so that certificates
    issued together do not all renew at once. ValueError for a window that is empty or a
    fraction and jitter that could fall outside it.
    """
    lifetime = not_after - not_before
    if lifetime <= timedelta(0):
        raise ValueError("the certificate's validity window is empty")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction {fraction} is not between 0 and 1")
    if not 0.0 <= jitter < min(fraction, 1.0 - fraction):
        raise ValueError(f"jitter {jitter} must be at least 0 and keep the renewal in the window")
    if jitter:
        fraction += jitter * (2.0 * (rng or random).random() - 1.0)
    return not_before + lifetime * fraction


def needs_renewal(cert: x509.Certificate, now: datetime, fraction: float = RENEW_FRACTION) -> bool:
    """True once ``now`` has reached the certificate's renewal time (an expired one included)."""
    return now >= renew_at(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction)
