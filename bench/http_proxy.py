# ruff: noqa: E402
"""HTTP/1.1 on loopback: requests/s and latency with wrk, against direct and HAProxy.

    python -m bench.http_proxy [--rounds 3] [--duration 5] [--connections 50] [--quick]
                               [--compare DIR]

One fast upstream answers every GET with a 13-byte body, keep-alive: nginx (one worker) when
it is installed, else a Python one (httptools on uvloop, one process); the output says which.
Subjects, each in its own process and all on the same hop to that upstream:

- direct: wrk to the upstream;
- haproxy: HAProxy in ``mode http``, keep-alive on both sides, server connections reused
  (one thread unless --haproxy-threads);
- composemesh: the proxy's outbound HTTP path on uvloop, as the outbound capture hands it
  a connection: a routing table with one mesh service and one endpoint (the upstream), the
  original destination given by an injected resolver; every request is parsed, routed and
  carried over a pooled upstream connection;
- composemesh tcp (with --tcp-path): the same service declared ``tcp``: bytes pass through;
- with --observability, the same path three more ways, to price what it records: ``no
  metrics`` (the counters' calls do nothing), ``+access log`` (a JSON line per request,
  written to a pipe that another process (`cat`) drains, as dockerd drains a container's
  stdout), and
  ``+log+trace`` (the log, and every request sampled: a span per request, batched to a
  Zipkin collector on loopback that answers 202); the plain ``composemesh`` subject has the
  metrics and neither (its trace headers and request id untouched);
- composemesh@DIR (with --compare DIR, a checkout of another revision, e.g. from
  ``git worktree add``): that revision's outbound HTTP path, built by that revision's own
  bench, run in the same rounds: a change's before/after, paired round by round.

Figures per subject, with wrk (keep-alive, one request in flight per connection) at one
connection (the latency of a lone client: Debian's wrk has no fixed-rate mode) and at
--connections: requests/s, and the p50 and p99 latency; for the proxies, the CPU time each
spent per request (/proc: user + system, over the run), which the machine's other load
moves far less than it moves the rates.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio

from bench._common import (
    Baseline,
    BenchError,
    Components,
    Metric,
    Ready,
    Results,
    console,
    cpu_seconds,
    find_tool,
    print_header,
    print_ratio_note,
    progress,
    require_tools,
    results_table,
    rotated,
    run_with_components,
    run_wrk,
    serve_forever,
    start_haproxy,
    start_nginx,
    tool_version,
)

SCRIPT = "bench/http_proxy.py"
UPSTREAM_HOST = "127.0.0.2"  # the mesh service's endpoint address in the routing table
PROXY_HOST = "127.0.0.1"
BODY = "Hello, world!"
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\n"
          + BODY.encode())
BASELINES = (Baseline("direct", "÷ direct"), Baseline("haproxy", "÷ HAProxy"))


# --------------------------------------------------------------------------- components


def python_upstream(ready: Ready) -> None:
    """Answers every request with ANSWER, keep-alive: httptools on uvloop."""
    import httptools

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(ANSWER)

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            Answer, UPSTREAM_HOST, 0, backlog=4096)

    serve_forever(ready, start)


def compared_outbound(ready: Ready, tree: str, upstream_port: int, protocol: str) -> None:
    """``composemesh_outbound`` of the checkout at ``tree``: its bench, its composemesh."""
    import importlib.util

    sys.path.insert(0, tree)  # composemesh is not imported yet in this process: tree's is
    spec = importlib.util.spec_from_file_location(
        "bench_compared", Path(tree) / "bench" / "http_proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.composemesh_outbound(ready, upstream_port, protocol)


def span_collector(ready: Ready) -> None:
    """A Zipkin collector that takes every POST and answers 202 (no parsing)."""
    from aiohttp import web

    async def start() -> asyncio.Server:
        async def spans(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=202)

        app = web.Application()
        app.router.add_post("/api/v2/spans", spans)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, PROXY_HOST, 0)
        await site.start()
        return site._server  # type: ignore[return-value]  # noqa: SLF001 (its one socket)

    serve_forever(ready, start)


def composemesh_outbound(ready: Ready, upstream_port: int, protocol: str,
                         variant: str = "", collector: str = "") -> None:
    """The outbound listener of a proxy whose snapshot knows one service, ``upstream``, with
    one endpoint: the upstream, its port's protocol ``protocol``. ``variant``: "" (metrics),
    "no metrics", "+access log", "+log+trace" (spans to ``collector``)."""
    import random
    import subprocess

    from composemesh.model.routing import (
        HttpRoute,
        ServiceRouting,
        WeightedSubset,
    )
    from composemesh.model.snapshot import (
        DeclaredProtocols,
        ProxyIdentity,
        ServiceEndpoint,
        Snapshot,
        SnapshotSettings,
    )
    from composemesh.proxy.http import HttpPath
    from composemesh.proxy.router import EMPTY_INBOUND, Router, Routers
    from composemesh.proxy.stats import OUTBOUND, ProxyStats, workload_of
    from composemesh.proxy.table import table_from_snapshot
    from composemesh.proxy.tcp import Forwarder

    async def start() -> asyncio.Server:
        routing = ServiceRouting("upstream", (HttpRoute("default", (), (
            WeightedSubset("v1", 100),)),))
        identity = ProxyIdentity("bench-client-1", "bench", "client", "client", "v1")
        snapshot = Snapshot("1", identity, settings=SnapshotSettings(
            services={"upstream": (ServiceEndpoint("bench-upstream-1", "v1", UPSTREAM_HOST),)},
            routing={"upstream": routing},
            protocols={"upstream": DeclaredProtocols(
                "tcp" if protocol == "tcp" else "http")},
        ))
        stats = ProxyStats()
        if variant == "no metrics":
            stats.http_request = lambda *args, **kwargs: None  # type: ignore[method-assign]
        observer = None
        if variant in ("+access log", "+log+trace"):
            from composemesh.model.monitoring import Telemetry, TracingSettings
            from composemesh.proxy.access_log import AccessLog
            from composemesh.proxy.telemetry import Observer

            # the pipe's reader is another process, as dockerd is a container's stdout's
            drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL)
            assert drain.stdin is not None
            observer = Observer(AccessLog(drain.stdin.fileno()))
            observer.apply(Telemetry(tracing=TracingSettings(zipkin=collector, sampling=1.0))
                           if variant == "+log+trace" else Telemetry())
        http = HttpPath(stats, observer=observer) if observer else HttpPath(stats)
        router = Router(table_from_snapshot(snapshot), workload_of(identity),
                        rng=random.Random(1), http=http.entry)
        http.switch.current = Routers(router, EMPTY_INBOUND)
        forwarder = Forwarder(OUTBOUND, stats, router.choose,
                              resolver=lambda sock: (UPSTREAM_HOST, upstream_port))
        return await asyncio.get_running_loop().create_server(
            forwarder, PROXY_HOST, 0, backlog=4096)

    serve_forever(ready, start)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds of each wrk run, whole seconds (default 5; quick 1)")
    parser.add_argument("--connections", type=int, default=50,
                        help="the concurrent level, besides one connection (default 50)")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto",
                        help="nginx when installed (auto), or the Python one")
    parser.add_argument("--tcp-path", action="store_true",
                        help="also the proxy with the service declared tcp (pass-through)")
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="HAProxy's nbthread (default 1, as the proxy has one loop)")
    parser.add_argument("--observability", action="store_true",
                        help="also the proxy without metrics, with access logs, with tracing")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    parser.add_argument("--compare", metavar="DIR",
                        help="also the proxy of the checkout in DIR (another revision)")
    args = parser.parse_args(argv)
    if args.compare and not (Path(args.compare) / "bench" / "http_proxy.py").is_file():
        parser.error(f"--compare: {args.compare} holds no bench/http_proxy.py")
    defaults = {"rounds": (3, 2), "duration": (5.0, 1.0)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.rounds < 1 or args.duration < 1 or args.connections < 2:
        parser.error("--rounds must be positive, --duration at least 1, --connections at least 2")
    return args


def start_upstream(args: argparse.Namespace, comps: Components) -> tuple[int, str]:
    """The upstream's port and how the output names it."""
    nginx = find_tool("nginx") if args.upstream != "python" else None
    if args.upstream == "nginx" and nginx is None:
        raise BenchError("nginx not found on PATH: apt-get install nginx-light, "
                         "or --upstream python")
    if nginx is not None:
        version = tool_version([nginx, "-v"], r"nginx/(\S+)")
        return start_nginx(comps, nginx, UPSTREAM_HOST, BODY), f"nginx {version}, 1 worker"
    port = comps.spawn("python upstream", python_upstream)
    why = "; nginx is not installed" if args.upstream == "auto" else ""
    return port, f"Python (httptools on uvloop, 1 process{why})"


def run(args: argparse.Namespace, comps: Components) -> Results:
    tools = require_tools("haproxy", "wrk")
    out = console()
    upstream_port, upstream_name = start_upstream(args, comps)
    haproxy_port = start_haproxy(comps, tools["haproxy"], "http",
                                 (UPSTREAM_HOST, upstream_port), args.haproxy_threads)
    pids = {"haproxy": comps.popens[-1][0].pid}  # the proxies' processes, for their CPU
    urls = {
        "direct": f"http://{UPSTREAM_HOST}:{upstream_port}/",
        "haproxy": f"http://{PROXY_HOST}:{haproxy_port}/",
    }
    for subject, protocol in (("composemesh", "http"), ("composemesh tcp", "tcp")):
        if protocol == "tcp" and not args.tcp_path:
            continue
        port = comps.spawn(f"{subject} proxy", composemesh_outbound, upstream_port, protocol)
        urls[subject] = f"http://{PROXY_HOST}:{port}/"
        pids[subject] = int(comps.children[-1].pid or 0)
    baselines: tuple[Baseline, ...] = BASELINES
    if args.observability:
        collector = comps.spawn("span collector", span_collector)
        for variant in ("no metrics", "+access log", "+log+trace"):
            port = comps.spawn(f"composemesh {variant} proxy", composemesh_outbound,
                               upstream_port, "http", variant,
                               f"http://{PROXY_HOST}:{collector}/api/v2/spans")
            urls[variant] = f"http://{PROXY_HOST}:{port}/"
            pids[variant] = int(comps.children[-1].pid or 0)
        baselines = (*BASELINES, Baseline("composemesh", "÷ composemesh"))
    if args.compare:
        subject = f"composemesh@{Path(args.compare).name}"
        port = comps.spawn(f"{subject} proxy", compared_outbound,
                           str(Path(args.compare).resolve()), upstream_port, "http")
        urls[subject] = f"http://{PROXY_HOST}:{port}/"
        pids[subject] = int(comps.children[-1].pid or 0)
        baselines = (*BASELINES, Baseline(subject, f"÷ {Path(args.compare).name}"))
    subjects = tuple(urls)
    levels = (1, args.connections)
    metrics = tuple(
        metric for c in levels for metric in (
            Metric(f"rps@{c}", f"req/s, {c} conn."),
            Metric(f"p50@{c}", f"p50 ms, {c} conn.", digits=3),
            Metric(f"p99@{c}", f"p99 ms, {c} conn.", digits=3),
            Metric(f"cpu@{c}", f"CPU µs / req., {c} conn.", digits=1),
        )
    )
    haproxy_version = tool_version([tools["haproxy"], "-v"], r"version (\S+)")
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s); wrk {args.duration:g} s per run, keep-alive, at 1 and "
        f"{args.connections} connections",
        f"upstream: {upstream_name}",
        f"haproxy {haproxy_version}: mode http, "
        f"keep-alive, http-reuse always, nbthread {args.haproxy_threads}",
        "composemesh: outbound HTTP path (one service, one endpoint) on uvloop",
    ])
    results: Results = {}
    for round_no in range(args.rounds):
        for connections in levels:
            for subject in rotated(subjects, round_no):
                pid = pids.get(subject)
                cpu = cpu_seconds(pid) if pid else 0.0
                got = run_wrk(tools["wrk"], urls[subject], connections, args.duration)
                figures = [("rps", got.requests_per_s), ("p50", got.p50_ms),
                           ("p99", got.p99_ms)]
                if pid and got.requests_per_s:
                    used = cpu_seconds(pid) - cpu
                    figures.append(("cpu", 1e6 * used / (got.requests_per_s * args.duration)))
                for key, value in figures:
                    results.setdefault((f"{key}@{connections}", subject), []).append(value)
        comps.check_alive()
        progress(f"round {round_no + 1}/{args.rounds} done")
    out.print(results_table("HTTP/1.1 on loopback, wrk (medians)", metrics, subjects, results,
                            baselines))
    print_ratio_note(out, "the p50 and p99 latencies and the CPU per request")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_with_components(SCRIPT, run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
