# ruff: noqa: E402
"""The ingress gateway: HTTPS in from outside, requests/s, latency and new TLS handshakes/s,
against HAProxy terminating the same TLS in front of the same upstream, same run.

    python -m bench.ingress [--rounds 3] [--duration 3] [--connections 50] [--quick]

One fast upstream (a Python one: httptools on uvloop) answers every GET with 13 bytes.
Subjects, each in its own process, each terminating TLS 1.3 with the same P-256 certificate
for ``localhost`` (so that wrk's SNI names it):

- haproxy tls: HAProxy ``mode http``, ``bind ... ssl crt``, keep-alive both sides;
- ingress: the ingress gateway's HTTPS listener (``proxy.ingress``) with a snapshot whose
  ingress routes ``localhost`` ``/`` to the upstream as a mesh service: SNI, Host and path
  routing, x-forwarded-*, then the outbound HTTP path over a pooled upstream connection.

Figures: with wrk, keep-alive at one connection and at --connections: requests/s, p50 and
p99 latency, CPU per request of the subject's process; and ``Connection: close`` at
--connections: new TLS connections (handshake, one request, close) per second.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import datetime

from bench._common import (
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
    run_wrk,
    serve_forever,
    tool_version,
)
from bench.http_proxy import PROXY_HOST, UPSTREAM_HOST, python_upstream

SCRIPT = "bench/ingress.py"
HOST = "localhost"  # the certificate's name and wrk's SNI
BASELINES = (Baseline("haproxy tls", "÷ HAProxy TLS"),)


def write_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for ``HOST`` and its key, PEM: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def ingress_gateway(ready: Ready, upstream_port: int, cert_dir: str) -> None:
    """The ingress gateway's HTTPS listener, ``HOST`` routed to the upstream."""
    import random

    from composemesh.model.ingress import IngressHostSpec, IngressPath, IngressSettings
    from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
    from composemesh.model.snapshot import (
        DeclaredProtocols,
        ProxyIdentity,
        ServiceEndpoint,
        Snapshot,
        SnapshotSettings,
        encode_snapshot,
    )
    from composemesh.proxy.http import HttpPath
    from composemesh.proxy.ingress import start_ingress
    from composemesh.proxy.pilot_client import ConfigStore
    from composemesh.proxy.router import RouterSwitch
    from composemesh.proxy.server import routing_applier
    from composemesh.proxy.stats import ProxyStats

    async def start() -> asyncio.Server:
        routing = ServiceRouting("upstream", (HttpRoute("default", (), (
            WeightedSubset("v1", 100),)),))
        identity = ProxyIdentity("bench-ingress-gateway-netns-1", "bench", "ingress-gateway",
                                 "ingress-gateway", "v1")
        settings = SnapshotSettings(
            services={"upstream": (ServiceEndpoint("bench-upstream-1", "v1", UPSTREAM_HOST),)},
            routing={"upstream": routing},
            protocols={"upstream": DeclaredProtocols("http")},
            ingress=IngressSettings(https=True, hosts=(IngressHostSpec(HOST, tls=True, routes=(
                IngressPath("/", "upstream", upstream_port),)),)))
        switch = RouterSwitch()
        http = HttpPath(ProxyStats(), switch=switch)
        answer = ConfigStore([routing_applier(switch, http, random.Random(1))]).offer(
            encode_snapshot(Snapshot("1", identity, settings=settings)))
        if not answer.ok:
            raise BenchError(f"the gateway refused its snapshot: {answer.reason}")
        servers = await start_ingress(http, host=PROXY_HOST, http_port=None,
                                      https_port=free_port(), cert_dir=Path(cert_dir))
        return servers[0]

    serve_forever(ready, start)


def start_haproxy_tls(comps: Components, binary: str, server: tuple[str, int],
                      cert: Path, key: Path, threads: int) -> int:
    pem = comps.workdir / "haproxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    port = free_port()
    bind = f"    bind {PROXY_HOST}:{port}"
    text = haproxy_config("http", (PROXY_HOST, port), server, threads).replace(
        bind, f"{bind} ssl crt {pem}")
    config = comps.workdir / "haproxy-tls.cfg"
    config.write_text(text)
    comps.run("haproxy tls", [binary, "-db", "-f", str(config)], PROXY_HOST, port)
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds of each wrk run, whole seconds (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=50,
                        help="the concurrent level, besides one connection (default 50)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if args.rounds < 1 or args.duration < 1 or args.connections < 2:
        parser.error("--rounds must be positive, --duration at least 1, --connections at least 2")
    return args


def run(args: argparse.Namespace, comps: Components) -> Results:
    tools = require_tools("haproxy", "wrk")
    out = console()
    upstream_port = comps.spawn("python upstream", python_upstream)
    cert_file, key_file = write_certificate(comps.workdir / "certs" / HOST)
    haproxy_port = start_haproxy_tls(comps, tools["haproxy"], (UPSTREAM_HOST, upstream_port),
                                     cert_file, key_file, 1)
    pids = {"haproxy tls": comps.popens[-1][0].pid}
    ingress_port = comps.spawn("ingress gateway", ingress_gateway, upstream_port,
                               str(comps.workdir / "certs"))
    pids["ingress"] = int(comps.children[-1].pid or 0)
    urls = {"haproxy tls": f"https://{HOST}:{haproxy_port}/",
            "ingress": f"https://{HOST}:{ingress_port}/"}
    subjects = tuple(urls)
    levels = (1, args.connections)
    metrics = (*(m for c in levels for m in (
        Metric(f"rps@{c}", f"req/s, {c} conn."),
        Metric(f"p50@{c}", f"p50 ms, {c} conn.", digits=3),
        Metric(f"p99@{c}", f"p99 ms, {c} conn.", digits=3),
        Metric(f"cpu@{c}", f"CPU µs / req., {c} conn.", digits=1),
    )), Metric("hs", f"new TLS conn./s, {args.connections} clients"),
        Metric("cpu_hs", "CPU µs / new conn.", digits=1))
    haproxy_version = tool_version([tools["haproxy"], "-v"], r"version (\S+)")
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s); wrk {args.duration:g} s per run (HTTPS, SNI {HOST}), at 1 and "
        f"{args.connections} connections, then {args.connections} clients with "
        "Connection: close",
        "upstream: Python (httptools on uvloop, 1 process)",
        f"haproxy {haproxy_version}: mode http, "
        "ssl crt, nbthread 1; ingress: composemesh's ingress listener on uvloop",
    ])
    results: Results = {}
    runs = [(c, (), c) for c in levels] + [("hs", ("Connection: close",), args.connections)]
    for round_no in range(args.rounds):
        for label, headers, connections in runs:
            for subject in rotated(subjects, round_no):
                pid = pids[subject]
                before = cpu_seconds(pid)
                got = run_wrk(tools["wrk"], urls[subject], connections, args.duration,
                              headers=headers)
                used = cpu_seconds(pid) - before
                per = 1e6 * used / (got.requests_per_s * args.duration) if got.requests_per_s \
                    else 0.0
                if label == "hs":
                    figures = [("hs", got.requests_per_s), ("cpu_hs", per)]
                else:
                    figures = [(f"rps@{label}", got.requests_per_s), (f"p50@{label}", got.p50_ms),
                               (f"p99@{label}", got.p99_ms), (f"cpu@{label}", per)]
                for name, value in figures:
                    results.setdefault((name, subject), []).append(value)
        comps.check_alive()
        progress(f"round {round_no + 1}/{args.rounds} done")
    out.print(results_table("HTTPS through the ingress, wrk (medians)", metrics, subjects,
                            results, BASELINES))
    print_ratio_note(out, "the latencies and the CPU rows")
    return results


def main(argv: list[str] | None = None) -> int:
    run_with_components(SCRIPT, run, parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
