"""bench/mtls.py still runs: one short round of each of its loads (figures printed, with -s).

Nothing is asserted about speed (bench/README.md says why); this only keeps the script from
rotting, as it wires the proxy's data path by hand.
"""

from __future__ import annotations

import pytest

from bench import mtls
from bench._common import find_tool


@pytest.mark.skipif(find_tool("haproxy") is None, reason="haproxy is not installed")
def test_mtls_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = mtls.main(["--rounds", "1", "--duration", "0.3", "--connections", "4",
                      "--clients", "1", "--no-ca-sign"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    for subject in (*mtls.HANDSHAKE_SUBJECTS, *mtls.LATENCY_SUBJECTS):
        assert subject in out
