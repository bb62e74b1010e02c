"""Values shared by the CA tests: a fixed clock reading, the trust domain, one identity."""

from __future__ import annotations

from datetime import UTC, datetime

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
TD = "cluster.local"
REVIEWS = "spiffe://cluster.local/ns/shop/sa/reviews"
