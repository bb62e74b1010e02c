# ruff: noqa: E402
"""Mutual TLS between proxies: handshakes/s, added latency at a fixed rate, certificates/s.

    python -m bench.mtls [--rounds 3] [--duration 3] [--rate 200] [--connections 32] [--quick]
                         [--compare DIR]

Every component runs in its own process on loopback (no Docker, no iptables): one upstream
(nginx with one worker if installed, else the Python one of bench/http_proxy.py) at
127.0.0.2; proxy B, the upstream's sidecar, whose *inbound* listener (127.0.0.3) takes
mTLS and, being PERMISSIVE, plaintext too, and hands each request to the upstream as its
original destination; proxies A, a client's sidecar, whose *outbound* listener (127.0.0.1)
routes to B, with a workload certificate (mTLS) or without one (plaintext). Each proxy is
the real data path wired as ``proxy.server.serve`` wires it, fed a snapshot, on uvloop.
Certificates come from ``ca.CertificateAuthority`` (trust domain cluster.local, project
shop: B is ``sa/reviews``, the clients ``sa/productpage``).

1. Handshakes: --connections clients (in --clients processes, uvloop) each open a new
   connection, send one GET, read the answer, close, again, for --duration s. Subjects:
   B's inbound in **plaintext**, B's inbound with **mTLS** (the client presents a mesh
   certificate; B checks its chain and SPIFFE ID); **haproxy** ``mode http`` in plaintext,
   and **haproxy tls** terminating TLS (``ssl crt ... verify required ca-file ...``), both in
   front of the upstream. Figures: connections/s, and the listener process's CPU (from
   /proc: % of one core, and µs per connection), which says who was the bottleneck.
2. Latency at a fixed rate: an open-loop generator (uvloop, keep-alive connections, one
   request every 1/--rate s whether or not the previous ones were answered; a connection
   is opened if none is idle) for --duration s after a warm-up, to **direct** (the upstream),
   the **plaintext chain** (A, B in plaintext) and the **mTLS chain** (A, B over mTLS).
   Figures: p50 and p99 latency, each from the moment the request is written to its last
   byte read, and the p50 and p99 that mTLS adds over plaintext, per round.
3. Certificates signed per second: bench/ca_sign.py, run as it is (--no-ca-sign: not).

With --compare DIR (a checkout of another revision, e.g. from ``git worktree add DIR REV``),
its proxies run beside these in the same rounds: **mTLS@DIR** (its B's inbound, handshakes)
and **mTLS chain@DIR** (its A and B, latency), each paired round by round with this tree's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bench import ca_sign
from bench._common import (
    MP,
    Baseline,
    BenchError,
    Components,
    Metric,
    Ready,
    Results,
    console,
    cpu_seconds,
    free_port,
    haproxy_config,
    print_header,
    print_ratio_note,
    progress,
    require_tools,
    results_table,
    rotated,
    run_with_components,
    serve_forever,
    start_haproxy,
    tool_version,
)
from bench.http_proxy import UPSTREAM_HOST, start_upstream

SCRIPT = "bench/mtls.py"
TD, PROJECT = "cluster.local", "shop"
A_HOST, B_HOST = "127.0.0.1", "127.0.0.3"  # the upstream is at UPSTREAM_HOST, 127.0.0.2
REQUEST = b"GET / HTTP/1.1\r\nHost: reviews\r\nUser-Agent: bench\r\n\r\n"
TIMEOUT = 10.0  # seconds one step of a bench connection may take
WARMUP = 0.5  # seconds of the fixed-rate load before the measured ones (pools, caches)
PLAIN, MTLS, HAPROXY, HAPROXY_TLS = "plaintext", "mTLS", "haproxy", "haproxy tls"
DIRECT, PLAIN_CHAIN, MTLS_CHAIN = "direct", "plaintext chain", "mTLS chain"
HANDSHAKE_SUBJECTS = (PLAIN, MTLS, HAPROXY, HAPROXY_TLS)
LATENCY_SUBJECTS = (DIRECT, PLAIN_CHAIN, MTLS_CHAIN)
HANDSHAKE_METRICS = (
    Metric("conns", "connections/s"),
    Metric("cpu", "listener CPU, % of a core"),
    Metric("cpu_us", "listener CPU µs / conn."),
)
LATENCY_METRICS = (Metric("p50", "p50 ms", digits=3), Metric("p99", "p99 ms", digits=3))
ADDED_METRICS = (Metric("add_p50", "added p50 ms", digits=3),
                 Metric("add_p99", "added p99 ms", digits=3))
ADDED = f"{MTLS_CHAIN} − {PLAIN_CHAIN}"

Material = tuple[bytes, bytes, bytes]  # certificate chain, its key, trust bundle (PEM)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificates:
    server: Material  # B's (and HAProxy's): spiffe://cluster.local/ns/shop/sa/reviews
    client: Material  # A's and the handshake clients': .../sa/productpage


def issue_certificates() -> Certificates:
    """A root, and one workload certificate per side signed by the mesh CA over a CSR."""
    from composemesh.ca import (
        CertificateAuthority,
        SpiffeId,
        csr_to_pem,
        generate_key,
        key_to_pem,
        make_csr,
        make_root,
    )

    ca = CertificateAuthority(*make_root("bench root", TD), TD, timedelta(hours=24))

    def material(service: str) -> Material:
        key = generate_key()
        signed = ca.sign(csr_to_pem(make_csr(key)), SpiffeId(TD, PROJECT, service))
        return signed.chain_pem, key_to_pem(key), ca.trust_bundle()

    return Certificates(server=material("reviews"), client=material("productpage"))


# --------------------------------------------------------------------------- proxies


def mesh_proxy(ready: Ready, side: str, host: str, original: tuple[str, int],
               service: str, settings: dict[str, Any], material: Material | None) -> None:
    """A proxy's data path as ``proxy.server.serve`` builds it (``server.data_path``: both
    forwarders, both HTTP paths, mTLS contexts), fed one snapshot through its applier and
    listening with its ``side`` listener on ``host``. ``original`` stands in for
    SO_ORIGINAL_DST; without ``material`` the proxy has no certificate (plaintext)."""
    import random

    from composemesh.model.snapshot import (
        ProxyIdentity,
        Snapshot,
        SnapshotSettings,
        encode_snapshot,
    )
    from composemesh.model.wire import convert
    from composemesh.proxy.pilot_client import ConfigStore
    from composemesh.proxy.server import data_path
    from composemesh.proxy.stats import INBOUND, PeerLabels

    async def start() -> asyncio.Server:
        path = data_path(PeerLabels(), lambda: True, resolver=lambda sock: original,
                         rng=random.Random(1))
        if material is not None:
            path.tls.use(*material)
        identity = ProxyIdentity(node=f"{PROJECT}-{service}-1", project=PROJECT,
                                 compose_service=service, service=service, version="v1")
        answer = ConfigStore([path.apply]).offer(encode_snapshot(Snapshot(
            "1", identity, settings=convert({"trust_domain": TD, **settings},
                                            SnapshotSettings))))
        if not answer.ok:
            raise BenchError(f"{service}'s proxy refused its snapshot: {answer.reason}")
        listener = path.inbound if side == INBOUND else path.outbound
        return await asyncio.get_running_loop().create_server(listener, host, 0, backlog=4096)

    serve_forever(ready, start)


HTTP_PROTOCOL = {"reviews": {"default": "http", "ports": {}}}
B_SETTINGS = {"mtls_mode": "PERMISSIVE", "protocols": HTTP_PROTOCOL}


def a_settings() -> dict[str, Any]:
    """A's snapshot: one mesh service, reviews, whose one endpoint is B."""
    return {"services": {"reviews": [{"node": f"{PROJECT}-reviews-1", "version": "v1",
                                      "address": B_HOST}]},
            "protocols": HTTP_PROTOCOL}


def start_haproxy_tls(comps: Components, binary: str, server: tuple[str, int],
                      material: Material, threads: int) -> int:
    """HAProxy ``mode http`` terminating TLS with B's certificate, a client certificate
    required that chains to the mesh's bundle; the port it listens on."""
    chain, key, bundle = material
    crt, ca_file = comps.workdir / "haproxy.pem", comps.workdir / "bundle.pem"
    crt.write_bytes(chain + key)
    ca_file.write_bytes(bundle)
    port = free_port()
    bind = f"    bind 127.0.0.1:{port}"
    text = haproxy_config("http", ("127.0.0.1", port), server, threads).replace(
        bind, f"{bind} ssl crt {crt} verify required ca-file {ca_file}")
    config = comps.workdir / "haproxy-tls.cfg"
    config.write_text(text)
    comps.run("haproxy tls", [binary, "-db", "-f", str(config)], "127.0.0.1", port)
    return port


# --------------------------------------------------------------------------- clients


class Client(asyncio.Protocol):
    """One HTTP/1.1 connection of the load: ``request()`` writes REQUEST, its future gets the
    answer's status once the whole answer is read (keep-alive: again, on the same)."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.error = httptools.HttpParserError
        self.answered: asyncio.Future[int] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def request(self) -> asyncio.Future[int]:
        self.answered = asyncio.get_running_loop().create_future()
        self.transport.write(REQUEST)
        return self.answered

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.error as exc:
            self._settle(exc)
            self.transport.abort()

    def on_message_complete(self) -> None:
        self._settle(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._settle(ConnectionError("closed before the answer"))

    def _settle(self, outcome: int | Exception) -> None:
        answered = self.answered
        if answered is None or answered.done():
            return
        if isinstance(outcome, Exception):
            answered.set_exception(outcome)
        else:
            answered.set_result(outcome)


async def _connect(host: str, port: int, context: ssl.SSLContext | None = None) -> Client:
    """A new connection; with ``context``, mutual TLS over ``TlsLink`` as proxy A speaks it
    (its ``close`` sends close_notify and a FIN at once, as A's does)."""
    loop = asyncio.get_running_loop()
    if context is None:
        _, client = await asyncio.wait_for(loop.create_connection(Client, host, port), TIMEOUT)
        return client
    from composemesh.proxy.tls_link import TlsLink

    link = TlsLink(context, server_side=False, handshake_timeout=TIMEOUT)
    await asyncio.wait_for(loop.create_connection(lambda: link, host, port), TIMEOUT)
    await link.handshake
    client = Client()
    link.attach(client)
    return client


def handshake_load(host: str, port: int, material: Material | None, seconds: float,
                   concurrency: int) -> tuple[int, int, float]:
    """In a load process: ``concurrency`` clients that each connect (mTLS with ``material``,
    else plaintext), GET once, read the answer, close, for ``seconds``:
    (connections, failures, elapsed)."""
    import uvloop

    from composemesh.ca.tls import client_context

    context = None
    if material is not None:  # the listener checks our certificate; we skip checking its
        context = client_context(*material)  # (a load generator's saving, as wrk's https)
        context.verify_mode = ssl.CERT_NONE
    done = [0, 0]

    async def one_after_another(until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            try:
                client = await _connect(host, port, context)
                status = await asyncio.wait_for(client.request(), TIMEOUT)
                client.transport.close()
                await asyncio.wait_for(client.lost, TIMEOUT)
                done[status != 200] += 1
            except (OSError, ssl.SSLError, TimeoutError):
                done[1] += 1

    async def main() -> float:
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(one_after_another(start + seconds) for _ in range(concurrency)))
        return asyncio.get_running_loop().time() - start

    elapsed = uvloop.run(main())
    return done[0], done[1], elapsed


def fixed_rate(host: str, port: int, rate: float, seconds: float) -> list[float]:
    """Latencies (ms) of an open-loop load of ``rate`` GETs/s on keep-alive connections for
    ``seconds``, after WARMUP s whose latencies are dropped; BenchError if any failed."""
    import uvloop

    latencies: list[float] = []
    failures: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        idle = [await _connect(host, port) for _ in range(4)]
        in_flight: set[asyncio.Task[None]] = set()
        start = loop.time()
        measured_from = round(WARMUP * rate)

        async def one(client: Client, keep: bool) -> None:
            begun = time.perf_counter()
            try:
                status = await asyncio.wait_for(client.request(), TIMEOUT)
            except (OSError, TimeoutError) as exc:
                failures.append(exc)
                return
            took = (time.perf_counter() - begun) * 1000.0
            idle.append(client)
            if status != 200:
                failures.append(BenchError(f"answer {status}"))
            elif keep:
                latencies.append(took)

        for i in range(round((WARMUP + seconds) * rate)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            client = idle.pop() if idle else await _connect(host, port)
            task = loop.create_task(one(client, i >= measured_from))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=TIMEOUT)
        for client in idle:
            client.transport.close()

    uvloop.run(main())
    if failures or not latencies:
        raise BenchError(f"{host}:{port}: {len(failures)} request(s) failed at {rate:g}/s, "
                         f"the first: {failures[0] if failures else 'none answered'!r}")
    return latencies


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# --------------------------------------------------------------------------- main


def compared_proxy(ready: Ready, tree: str, *args: Any) -> None:
    """``mesh_proxy`` of the checkout at ``tree``: its bench, its composemesh."""
    import importlib.util

    sys.path.insert(0, tree)  # composemesh is not imported yet in this process: tree's is
    spec = importlib.util.spec_from_file_location("bench_compared", Path(tree) / SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.mesh_proxy(ready, *args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds of each measurement (default 3; quick 1)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="requests/s of the fixed-rate latency load (default 200)")
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent clients of the handshake load (default 32)")
    parser.add_argument("--clients", type=int, default=2,
                        help="processes the handshake clients are spread over (default 2)")
    parser.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto",
                        help="nginx when installed (auto), or the Python one")
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="HAProxy's nbthread (default 1, as the proxy has one loop)")
    parser.add_argument("--no-ca-sign", action="store_true",
                        help="skip the certificates/s figures of bench/ca_sign.py")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    parser.add_argument("--compare", metavar="DIR",
                        help="also the proxies of the checkout in DIR (another revision)")
    args = parser.parse_args(argv)
    if args.compare and not (Path(args.compare) / SCRIPT).is_file():
        parser.error(f"--compare: {args.compare} holds no {SCRIPT}")
    tag = f"@{Path(args.compare).name}" if args.compare else ""
    args.mtls_before = f"{MTLS}{tag}" if tag else None
    args.chain_before = f"{MTLS_CHAIN}{tag}" if tag else None
    args.handshake_subjects = (*HANDSHAKE_SUBJECTS, *([args.mtls_before] if tag else []))
    args.latency_subjects = (*LATENCY_SUBJECTS, *([args.chain_before] if tag else []))
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if (args.rounds < 1 or args.duration <= 0 or args.rate <= 0 or args.clients < 1
            or args.connections < args.clients):
        parser.error("--rounds, --duration and --rate must be positive, and --connections "
                     "at least --clients (at least 1)")
    return args


def measure_handshakes(args: argparse.Namespace, targets: dict[str, tuple[str, int, int]],
                       material: Material, pool: Any, round_no: int, results: Results) -> None:
    """One round of the handshake load against each subject (host, port, listener's pid)."""
    per_process = [args.connections // args.clients + (i < args.connections % args.clients)
                   for i in range(args.clients)]
    for subject in rotated(args.handshake_subjects, round_no):
        host, port, pid = targets[subject]
        secure = material if subject in (MTLS, HAPROXY_TLS, args.mtls_before) else None
        cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
        done = pool.starmap(handshake_load, [(host, port, secure, args.duration, n)
                                             for n in per_process])
        cpu = cpu_seconds(pid) - cpu_before
        wall = time.monotonic() - wall_before
        count, failed = sum(d[0] for d in done), sum(d[1] for d in done)
        if failed:
            raise BenchError(f"{subject}: {failed} of {count + failed} connection(s) failed")
        for key, value in (("conns", sum(d[0] / d[2] for d in done)),
                           ("cpu", 100.0 * cpu / wall), ("cpu_us", 1e6 * cpu / count)):
            results.setdefault((key, subject), []).append(value)


def measure_latency(args: argparse.Namespace, targets: dict[str, tuple[str, int]],
                    round_no: int, results: Results) -> None:
    """One round of the fixed-rate load against each subject, and what mTLS adds."""
    figures: dict[tuple[str, str], float] = {}
    for subject in rotated(args.latency_subjects, round_no):
        latencies = fixed_rate(*targets[subject], args.rate, args.duration)
        figures["p50", subject] = statistics.median(latencies)
        figures["p99", subject] = percentile(latencies, 99)
    for (key, subject), value in figures.items():
        results.setdefault((key, subject), []).append(value)
    for key in ("p50", "p99"):
        added = figures[key, MTLS_CHAIN] - figures[key, PLAIN_CHAIN]
        results.setdefault((f"add_{key}", ADDED), []).append(added)


def start_subjects(args: argparse.Namespace, comps: Components, tools: dict[str, str],
                   certs: Certificates) -> tuple[str, dict[str, tuple[str, int, int]],
                                                 dict[str, tuple[str, int]]]:
    """Every server of the run: the upstream's name, the handshake and the latency targets."""
    upstream_port, upstream_name = start_upstream(args, comps)
    upstream = (UPSTREAM_HOST, upstream_port)

    def spawned(what: str, target: Callable[..., None], *target_args: object) -> tuple[int, int]:
        port = comps.spawn(what, target, *target_args)
        pid = comps.children[-1].pid
        assert pid is not None
        return port, pid

    def ran(port: int) -> tuple[str, int, int]:
        return "127.0.0.1", port, comps.popens[-1][0].pid

    b_port, b_pid = spawned("proxy B", mesh_proxy, "inbound", B_HOST, upstream, "reviews",
                            B_SETTINGS, certs.server)
    handshakes = {
        PLAIN: (B_HOST, b_port, b_pid),
        MTLS: (B_HOST, b_port, b_pid),
        HAPROXY: ran(start_haproxy(comps, tools["haproxy"], "http", upstream,
                                   args.haproxy_threads)),
        HAPROXY_TLS: ran(start_haproxy_tls(comps, tools["haproxy"], upstream, certs.server,
                                           args.haproxy_threads)),
    }
    latency = {DIRECT: upstream}
    for subject, material in ((PLAIN_CHAIN, None), (MTLS_CHAIN, certs.client)):
        port, _ = spawned(f"proxy A ({subject})", mesh_proxy, "outbound", A_HOST,
                          (B_HOST, b_port), "productpage", a_settings(), material)
        latency[subject] = (A_HOST, port)
    if args.compare:  # the other revision's B and A, the same way
        tree = str(Path(args.compare).resolve())
        old_b, old_pid = spawned(f"proxy B ({args.mtls_before})", compared_proxy, tree,
                                 "inbound", B_HOST, upstream, "reviews", B_SETTINGS,
                                 certs.server)
        handshakes[args.mtls_before] = (B_HOST, old_b, old_pid)
        port, _ = spawned(f"proxy A ({args.chain_before})", compared_proxy, tree, "outbound",
                          A_HOST, (B_HOST, old_b), "productpage", a_settings(), certs.client)
        latency[args.chain_before] = (A_HOST, port)
    return upstream_name, handshakes, latency


def run(args: argparse.Namespace, comps: Components) -> Results:
    tools = require_tools("haproxy")
    out = console()
    certs = issue_certificates()
    upstream_name, handshakes, latency = start_subjects(args, comps, tools, certs)
    haproxy_version = tool_version([tools["haproxy"], "-v"], r"version (\S+)")
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s) of {args.duration:g} s per subject; TLS 1.3, P-256 "
        f"certificates, {ssl.OPENSSL_VERSION.rsplit(' ', 3)[0]}",
        f"upstream: {upstream_name}",
        f"proxies A and B: composemesh's data path on uvloop, one process each; haproxy "
        f"{haproxy_version}: mode http, nbthread {args.haproxy_threads}",
        f"handshakes: {args.connections} clients ({args.clients} process(es)) connect, GET "
        "once, close: into B's inbound listener or haproxy",
        f"latency: open loop, {args.rate:g} req/s on keep-alive connections, {WARMUP:g} s "
        "warm-up; client -> A -> B -> upstream",
    ])
    results: Results = {}
    pool = MP.Pool(args.clients)
    try:
        for round_no in range(args.rounds):
            measure_handshakes(args, handshakes, certs.client, pool, round_no, results)
            measure_latency(args, latency, round_no, results)
            comps.check_alive()
            progress(f"round {round_no + 1}/{args.rounds} done")
    finally:
        pool.terminate()
    out.print(results_table("New connections into one listener (medians)", HANDSHAKE_METRICS,
                            args.handshake_subjects, results,
                            (Baseline(PLAIN, "÷ plaintext"), Baseline(HAPROXY_TLS,
                                                                      "÷ HAProxy TLS"),
                             *before(args.mtls_before))))
    print_ratio_note(out, "the CPU rows")
    out.print(results_table(f"Latency at {args.rate:g} req/s, open loop (medians)",
                            LATENCY_METRICS, args.latency_subjects, results,
                            (Baseline(DIRECT, "÷ direct"), Baseline(PLAIN_CHAIN,
                                                                    "÷ plaintext chain"),
                             *before(args.chain_before))))
    out.print(results_table("What mTLS adds to the chain's latency (per round, medians)",
                            ADDED_METRICS, (ADDED,), results, ()))
    print_ratio_note(out, "the latencies")
    return results


def before(subject: str | None) -> tuple[Baseline, ...]:
    """The other revision's subject as a baseline, with --compare."""
    return (Baseline(subject, f"÷ {subject.partition('@')[2]}"),) if subject else ()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_with_components(SCRIPT, run, args)
    if not args.no_ca_sign:  # the proxies are stopped: the CA's figures on a quiet machine
        print(flush=True)
        ca_sign.main(["--rounds", str(args.rounds)] + (["--quick"] if args.quick else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
