"""Settings for the proxy's tests, read as a proxy reads them: through the contract's codec.

A test may write a snapshot's settings as the wire's JSON values (to break one field on
purpose) or with the model's own values inside; ``settings_of`` encodes them in a snapshot
and decodes it back with ``decode_snapshot``, so what a test hands the proxy is what the
pilot's bytes would give, and a field that does not decode fails as in a NACK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from composemesh.model.snapshot import (
    ProxyIdentity,
    Snapshot,
    SnapshotSettings,
    decode_snapshot,
    encode_snapshot,
)

IDENTITY = ProxyIdentity("shop-web-netns-1", "shop", "web", "web", "v1")


def snapshot_of(settings: Mapping[str, Any], identity: ProxyIdentity = IDENTITY,
                version: str = "1") -> Snapshot:
    """A snapshot of ``settings``, as a proxy decodes it from the pilot's bytes."""
    return decode_snapshot(encode_snapshot(
        Snapshot(version, identity, settings=settings)))  # type: ignore[arg-type]


def settings_of(settings: Mapping[str, Any]) -> SnapshotSettings:
    """``settings`` as the typed settings a proxy decodes them to."""
    return snapshot_of(settings).settings
