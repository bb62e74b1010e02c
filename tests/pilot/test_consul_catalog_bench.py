"""bench/consul_catalog.py runs (a smoke run at a small size), and the catalog it prices is
really in every proxy's snapshot."""

from __future__ import annotations

import pytest

from bench import consul_catalog
from bench.pilot_push import mesh


def test_the_catalog_reaches_every_proxy_snapshot() -> None:
    base = mesh(8)
    ctx = consul_catalog.push(base, consul_catalog.catalog(3, 2))
    for w in base.workloads:
        snapshot = ctx.snapshot(w)
        assert {f"remote{i}" for i in range(3)} <= set(snapshot.settings.services)
        assert len(snapshot.settings.services["remote0"]) == 2
        assert set(snapshot.settings.dns) == {"remote0", "remote1", "remote2"}


def test_the_quick_run_prints_every_subject(capsys: pytest.CaptureFixture[str]) -> None:
    assert consul_catalog.main(["--quick", "--catalog", "2x1,4x2", "--proxies", "8"]) == 0
    out = capsys.readouterr().out
    for subject in ("no catalog", "2x1", "4x2"):
        assert subject in out
