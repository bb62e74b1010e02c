# ruff: noqa: E402
"""What a Consul catalog costs the pilot: one push to every proxy with S imported services of
I instances each, against the same push with no catalog.

    python -m bench.consul_catalog [--rounds 3] [--catalog 50x3,150x5,500x5] [--proxies 20]
                                   [--quick]

The mesh is bench/pilot_push.py's (N proxies: N/4 services, two versions, two instances); the
catalog is S services of another project, each with I instances behind its east-west gateway
(SPIFFE IDs in Meta, as composemesh registers them). A push is what the pilot does on a
catalog change: the mesh state rebuilt (``build_state``: routing over the remote versions
too), indexed once (``PushContext``), every proxy's snapshot rendered and encoded. Figures:
milliseconds per push (the best per round, medians), each proxy's snapshot in KiB, and the
Python heap the pilot's state and push hold at the end (tracemalloc).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import gc
import tracemalloc
from dataclasses import replace
from functools import partial

from bench._common import (
    Baseline,
    Metric,
    Results,
    console,
    print_header,
    print_ratio_note,
    progress,
    results_table,
    rotated,
)
from bench.pilot_push import mesh, timed
from composemesh.model.consul import CatalogInstance, ConsulView
from composemesh.model.mesh import MeshState
from composemesh.model.settings import parse_settings
from composemesh.pilot.build import build_state
from composemesh.pilot.push_context import PushContext

SCRIPT = "bench/consul_catalog.py"
NONE = "no catalog"


def catalog(services: int, instances: int) -> ConsulView:
    """``services`` services of project ``far``, ``instances`` each, at one gateway."""
    imported = {}
    for s in range(services):
        name = f"remote{s}"
        imported[name] = tuple(
            CatalogInstance(service=name, id=f"far-{name}-{i + 1}@192.0.2.20", node="far",
                            address="192.0.2.20", port=15443, tags=(f"v{i % 2 + 1}",),
                            version=f"v{i % 2 + 1}",
                            spiffe=f"spiffe://cluster.local/ns/far/sa/{name}", project="far")
            for i in range(instances))
    return ConsulView(reachable=True, imported=imported)


def push(base: MeshState, view: ConsulView | None) -> PushContext:
    if view is not None:  # a change is a new view: nothing of the last push is reused
        view = replace(view)
    state = build_state(base.project, base.workloads, base.settings, {}, base, consul=view)
    ctx = PushContext.build(state)
    for w in state.workloads:
        ctx.body(w)
    return ctx


def pushed(base: MeshState, view: ConsulView | None) -> None:
    push(base, view)


def heap_kib(base: MeshState, view: ConsulView | None) -> tuple[float, float]:
    """(KiB of Python heap the pushed state holds, KiB of one proxy's snapshot)."""
    gc.collect()
    tracemalloc.start()
    ctx = push(base, view)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = len(ctx.body(base.workloads[0])) / 1024
    return held / 1024, size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--catalog", default="50x3,150x5,500x5",
                        help="SERVICESxINSTANCES, comma-separated (default 50x3,150x5,500x5)")
    parser.add_argument("--proxies", type=int, default=20, help="local proxies (default 20)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, a few seconds")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    try:
        args.sizes = [tuple(int(n) for n in item.split("x")) for item in args.catalog.split(",")]
    except ValueError:
        parser.error("--catalog: SERVICESxINSTANCES, comma-separated")
    if args.rounds < 1 or args.proxies < 4 or any(len(s) != 2 or min(s) < 1 for s in args.sizes):
        parser.error("--rounds positive, --proxies at least 4, each size SxI of positives")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = console()
    minimum = 0.05 if args.quick else 0.5
    base = mesh(args.proxies)
    base = MeshState(project=base.project, workloads=base.workloads,
                     settings=parse_settings({}), routing=base.routing, policies=base.policies)
    subjects = (NONE, *(f"{s}x{i}" for s, i in args.sizes))
    views: dict[str, ConsulView | None] = {NONE: None}
    for s, i in args.sizes:
        views[f"{s}x{i}"] = catalog(s, i)
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s); the best of calls over {minimum:g} s per subject and round",
        f"{args.proxies} local proxies; catalogs of SxI (services x instances) elsewhere",
    ])
    metrics = [Metric("ms", "ms per push", 2), Metric("snap", "KiB per snapshot", 1),
               Metric("heap", "KiB heap held", 0)]
    results: Results = {}
    for round_no in range(args.rounds):
        for subject in rotated(subjects, round_no):
            results.setdefault(("ms", subject), []).append(
                timed(partial(pushed, base, views[subject]), minimum))
        progress(f"round {round_no + 1}/{args.rounds} done")
    for subject in subjects:
        held, size = heap_kib(base, views[subject])
        results[("heap", subject)] = [held]
        results[("snap", subject)] = [size]
    out.print(results_table("Pilot: a catalog change pushed to every proxy (medians)",
                            metrics, subjects, results, (Baseline(NONE, "÷ no catalog"),)))
    print_ratio_note(out, "every row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
