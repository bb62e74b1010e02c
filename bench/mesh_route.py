"""Mesh-level figures on the real engine: `route` to all-ACKed time, success rate while the
split changes under load, and a request's latency through two sidecars against a direct call.

    .venv/bin/python bench/mesh_route.py [--changes 10] [--requests 2000]

Brings up bench/mesh/compose.yaml as project `cmbench-<pid>`, measures, and always removes it.
The direct baseline is an unmeshed copy of the same app on the same network, so the ratio is
what two sidecars (capture, HTTP routing, pooled upstream) add to one call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from composemesh.engine.pilot_api import PilotChannel, find_channel

HERE = Path(__file__).resolve().parent
COMPOSE = HERE / "mesh" / "compose.yaml"
console = Console()

# Runs inside the client container: N sequential GETs, one JSON line of latencies (ms).
LATENCY = """
import http.client, json, sys, time
host, n = sys.argv[1], int(sys.argv[2])
out, fails = [], 0
for _ in range(n):
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection(host, 9080, timeout=10)
        c.request("GET", "/reviews/0"); r = c.getresponse(); r.read(); c.close()
        fails += r.status != 200
    except OSError:
        fails += 1
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps({"ms": out, "fails": fails}))
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "composemesh", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})


def status(pilot: PilotChannel) -> dict:
    return dict(json.loads(pilot.request("GET", "/v1/status").body))


def change_and_time(pilot: PilotChannel, weights: dict[str, int]) -> float:
    """Seconds from the PUT to every running proxy having ACKed the new snapshots."""
    started = time.perf_counter()
    answer = pilot.request("PUT", "/v1/routes/reviews", json.dumps({"weights": weights}).encode())
    generation = json.loads(answer.body)["generation"]
    while True:
        s = status(pilot)
        if s["generation"] >= generation and all(
                p["in_sync"] for p in s["proxies"] if p["running"]):
            return time.perf_counter() - started
        time.sleep(0.005)


def latencies(project: str, host: str, n: int, client: str = "client") -> tuple[list[float], int]:
    client = f"{project}-{client}-1"
    out = subprocess.run(["docker", "exec", client, "python3", "-c", LATENCY, host, str(n)],
                         capture_output=True, text=True, timeout=600)
    data = json.loads(out.stdout)
    return data["ms"], data["fails"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    project = f"cmbench-{os.getpid()}"
    console.print(f"bringing up {project} ...")
    up = cli("up", "-f", str(COMPOSE), "-p", project)
    try:
        if up.returncode != 0:
            console.print(up.stdout, up.stderr)
            return 1
        url = find_channel(project)  # the pilot's socket, as the CLI reaches it

        # 1. route -> all ACKed, idle mesh
        idle = [change_and_time(url, {"v1": 100 * (i % 2), "v2": 100 * ((i + 1) % 2)})
                for i in range(args.changes)]

        # 2. the same under steady load: success rate of the requests meanwhile
        result: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: result.update(zip(("ms", "fails"),
                                             latencies(project, "reviews", args.requests),
                                             strict=True)))
        worker.start()
        time.sleep(1)
        loaded: list[float] = []
        while worker.is_alive() and len(loaded) < args.changes:
            loaded.append(change_and_time(url, {"v1": 100 * (len(loaded) % 2),
                                                "v2": 100 * ((len(loaded) + 1) % 2)}))
            time.sleep(0.3)
        worker.join()
        load_ms = result["ms"]
        assert isinstance(load_ms, list)
        fails = int(result["fails"])  # type: ignore[call-overload]

        # 3. latency through two sidecars against a direct call to the unmeshed copy (v1 on
        # both sides: it answers without calling anyone)
        change_and_time(url, {"v1": 100, "v2": 0})
        direct_ms, direct_fails = latencies(project, "direct", args.requests, "client-direct")
        mesh_ms, mesh_fails = latencies(project, "reviews", args.requests)
    finally:
        cli("down", "-f", str(COMPOSE), "-p", project, "-v")

    table = Table(title=f"mesh figures ({time.strftime('%Y-%m-%d %H:%M')}, shared 2-core host)")
    for col in ("what", "figure", "baseline", "ratio"):
        table.add_column(col)
    table.add_row("route → all proxies ACKed, idle (median / max)",
                  f"{statistics.median(idle) * 1000:.0f} / {max(idle) * 1000:.0f} ms", "", "")
    table.add_row("route → all proxies ACKed, under load (median / max)",
                  f"{statistics.median(loaded) * 1000:.0f} / {max(loaded) * 1000:.0f} ms", "",
                  "")
    table.add_row(f"success while the split changed {len(loaded)}×",
                  f"{100 * (len(load_ms) - fails) / len(load_ms):.2f}% of {len(load_ms)}", "", "")
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        m, d = pct(mesh_ms, q), pct(direct_ms, q)
        table.add_row(f"latency {label}, new connection per request", f"{m:.2f} ms (mesh)",
                      f"{d:.2f} ms (direct)", f"{m / d:.2f}×")
    table.add_row("failed requests (mesh / direct)", f"{mesh_fails}", f"{direct_fails}", "")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
