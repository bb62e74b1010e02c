# ruff: noqa: E402
"""Pilot push cost: one change reaching every proxy, indexed once per push against per proxy.

    python -m bench.pilot_push [--rounds 3] [--proxies 50,200] [--quick]

For a mesh of N proxies (N/4 services, two versions, two instances each, one network, an
ALLOW policy per service), the work one push costs the pilot (every proxy's snapshot, as
each one's long poll is answered, encoded for the wire) done two ways in this process:

- push context (what the pilot does): ``PushContext.build`` indexes the mesh state once,
  then each proxy's snapshot is rendered from the index and encoded, once;
- per proxy (baseline; what the pilot did before issue 10): each proxy's snapshot from an
  index of the whole state made for it alone (``render_snapshot``), then encoded.

``status`` asks for every proxy's snapshot too: with the push context it is served from the
same cache (counted as a second pass, "push + status"); per proxy it was all done again.
Figures: milliseconds per push, the order of the subjects rotating each round.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time
from collections.abc import Callable
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
from composemesh.model.mesh import MeshState, NetworkAttachment, Workload
from composemesh.model.policy import Operation, Policy
from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import encode_snapshot
from composemesh.pilot.push_context import PushContext
from composemesh.pilot.render import render_snapshot

SCRIPT = "bench/pilot_push.py"
SUBJECTS = ("push context", "push context + status", "per proxy", "per proxy + status")
BASELINES = (Baseline("per proxy", "÷ per proxy"),)


def mesh(proxies: int) -> MeshState:
    """A project of ``proxies`` workloads: services of two versions, two instances each."""
    workloads = []
    routing = {}
    policies = {}
    for i in range(proxies):
        service, version, instance = f"svc{i // 4}", f"v{i % 4 // 2 + 1}", i % 2 + 1
        address = f"10.1.{i // 250}.{i % 250 + 2}"
        node = f"bench-{service}-{version}-netns-{instance}"
        workloads.append(Workload(
            node=node, project="bench", compose_service=f"{service}-{version}", service=service,
            version=version, addresses=(address,), running=True,
            proxy_container=node.replace("netns", "proxy"), proxy_healthy=True,
            networks=(("bench_default", address),),
            attachments=(NetworkAttachment("bench_default", address, "10.1.0.0/16",
                                           "10.1.0.1"),)))
        routing[service] = ServiceRouting(service, (HttpRoute("default", (), (
            WeightedSubset("v1", 90), WeightedSubset("v2", 10))),))
        caller = f"svc{(i // 4 + 1) % max(1, proxies // 4)}"
        policies[service] = (Policy(name=f"{service}-callers", sources=frozenset({caller}),
                                    operations=(Operation(methods=frozenset({"GET"})),)),)
    return MeshState(project="bench", workloads=tuple(workloads), routing=routing,
                     policies=policies)


def push_context(state: MeshState, passes: int) -> None:
    ctx = PushContext.build(state)
    for _ in range(passes):
        for w in state.workloads:
            ctx.body(w)


def per_proxy(state: MeshState, passes: int) -> None:
    for _ in range(passes):
        for w in state.workloads:
            encode_snapshot(render_snapshot(state, w))


def timed(fn: Callable[[], None], minimum: float) -> float:
    """Milliseconds one call of ``fn`` takes: the best of calls filling ``minimum`` seconds."""
    best = float("inf")
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start >= minimum:
            return best * 1000.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--proxies", default="50,200", help="mesh sizes (default 50,200)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, a few seconds")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    try:
        args.sizes = [int(n) for n in args.proxies.split(",")]
    except ValueError:
        parser.error("--proxies: comma-separated numbers")
    if args.rounds < 1 or any(n < 4 for n in args.sizes):
        parser.error("--rounds must be positive and each size at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = console()
    minimum = 0.05 if args.quick else 0.5
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s); the best of calls over {minimum:g} s per subject and round",
        "N proxies: N/4 services x 2 versions x 2 instances, one network, a policy each",
    ])
    metrics = [Metric(f"ms{n}", f"ms per push, N={n}", 2) for n in args.sizes]
    results: Results = {}
    for n, metric in zip(args.sizes, metrics, strict=True):
        state = mesh(n)
        calls: dict[str, Callable[[], None]] = {
            "push context": partial(push_context, state, 1),
            "push context + status": partial(push_context, state, 2),
            "per proxy": partial(per_proxy, state, 1),
            "per proxy + status": partial(per_proxy, state, 2),
        }
        for round_no in range(args.rounds):
            for subject in rotated(SUBJECTS, round_no):
                results.setdefault((metric.key, subject), []).append(
                    timed(calls[subject], minimum))
            progress(f"N={n}: round {round_no + 1}/{args.rounds} done")
    out.print(results_table("Pilot: one push to every proxy (best per round, medians)",
                            metrics, SUBJECTS, results, BASELINES))
    print_ratio_note(out, "every row (milliseconds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
