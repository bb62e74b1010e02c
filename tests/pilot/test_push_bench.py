"""bench/pilot_push.py runs (a smoke run at a small size), and what it compares is the same
work: both ways give every proxy the same snapshot bytes."""

from __future__ import annotations

import pytest

from bench import pilot_push
from composemesh.model.snapshot import encode_snapshot
from composemesh.pilot.push_context import PushContext
from composemesh.pilot.render import render_snapshot


def test_both_ways_render_the_same_snapshots_and_the_context_renders_each_once() -> None:
    state = pilot_push.mesh(12)
    ctx = PushContext.build(state)
    for _ in range(2):  # a push, then status
        for w in state.workloads:
            assert ctx.body(w) == encode_snapshot(render_snapshot(state, w))
    assert ctx.renders == len(state.workloads) == 12


def test_the_quick_run_prints_every_subject(capsys: pytest.CaptureFixture[str]) -> None:
    assert pilot_push.main(["--quick", "--proxies", "8"]) == 0
    out = capsys.readouterr().out
    for subject in pilot_push.SUBJECTS:
        assert subject in out
    assert "N=8" in out
