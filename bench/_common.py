"""What the benchmark scripts share: tools, processes, HAProxy, nginx, wrk, rounds and the table.

Every figure a script prints is the median of several rounds, and every round runs the
baselines and the subject one after the other (the order rotating from round to round), so
that a ratio compares runs made seconds apart on the same, shared, noisy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "apt-get install {pkg} (or run scripts/bootstrap.sh, which installs it)"
START_TIMEOUT = 30.0  # seconds a server process has to start listening

# The multiprocessing context of every component: a fresh interpreter each, as in a mesh.
MP = mp.get_context("spawn")
Ready = Any  # a multiprocessing Queue the child puts its port into (not subscriptable at runtime)


class BenchError(Exception):
    """Something the run cannot go on without; main() prints it and exits non-zero."""


def fail(script: str, message: str) -> None:
    """Print ``message`` as the script's one-line error and exit 2."""
    print(f"{script}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# --------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """The path of ``name`` on PATH, or in the sbin folders a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tools(*names: str) -> dict[str, str]:
    """The path of each tool; BenchError naming the missing ones and how to install them."""
    found = {name: find_tool(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        hints = "; ".join(INSTALL_HINT.format(pkg=name) for name in missing)
        raise BenchError(f"{', '.join(missing)} not found on PATH: {hints}")
    return {name: path for name, path in found.items() if path is not None}


def tool_version(argv: Sequence[str], pattern: str) -> str:
    """The first match of ``pattern`` (group 1) in what ``argv`` prints, or "?"."""
    out = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


# --------------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for servers that cannot report the one they got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int, alive: Callable[[], bool], what: str,
                   timeout: float = START_TIMEOUT) -> None:
    """Wait until ``host:port`` accepts a connection; BenchError if ``what`` dies or is slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"{what} exited before it listened on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {host}:{port} within {timeout:g} s")


def serve_forever(ready: Ready, start: Callable[[], Awaitable[asyncio.Server]]) -> None:
    """In a child process: run ``start()`` on uvloop, report the port it got, serve until killed."""
    import uvloop

    async def main() -> None:
        server = await start()
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    uvloop.run(main())


@dataclass
class Components:
    """The processes of one run; ``close()`` stops them all, whatever happened."""

    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="composemesh-bench-")))
    children: list[BaseProcess] = field(default_factory=list)
    popens: list[tuple[subprocess.Popen[bytes], str]] = field(default_factory=list)

    def spawn(self, what: str, target: Callable[..., None], *args: object) -> int:
        """Start ``target(ready, *args)`` in its own interpreter; the port it puts in ``ready``."""
        ready = MP.Queue()
        proc = MP.Process(target=target, args=(ready, *args), daemon=True, name=what)
        proc.start()
        self.children.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                return int(ready.get(timeout=0.2))
            except queue.Empty:
                if not proc.is_alive():
                    raise BenchError(
                        f"{what} exited (code {proc.exitcode}) before it listened") from None
        raise BenchError(f"{what} did not start within {START_TIMEOUT:g} s")

    def run(self, what: str, argv: Sequence[str], host: str, port: int) -> None:
        """Start an outside program that listens on ``host:port``; its output goes to a log."""
        log_path = self.workdir / f"{what.replace(' ', '-')}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.popens.append((popen, what))
        try:
            wait_listening(host, port, lambda: popen.poll() is None, what)
        except BenchError as exc:
            text = log_path.read_text(errors="replace").strip()
            raise BenchError(f"{exc}; its output:\n{text}" if text else str(exc)) from None

    def check_alive(self) -> None:
        """BenchError if a component died during the run (its figures would be meaningless)."""
        for proc in self.children:
            if not proc.is_alive():
                raise BenchError(f"{proc.name} exited (code {proc.exitcode}) during the run")
        for popen, what in self.popens:
            if popen.poll() is not None:
                raise BenchError(f"{what} exited (code {popen.returncode}) during the run")

    def close(self) -> None:
        for popen, _ in self.popens:
            if popen.poll() is None:
                popen.terminate()
        for proc in self.children:
            if proc.is_alive():
                proc.terminate()
        for popen, _ in self.popens:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        for proc in self.children:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def components() -> Iterator[Components]:
    comps = Components()
    try:
        yield comps
    finally:
        comps.close()


def run_with_components(script: str, run: Callable[[Any, Components], object],
                        args: Any) -> None:
    """``run(args, comps)`` with every component stopped after it; a BenchError or a failed
    benchmark connection ends the script with one error line (exit 2)."""
    try:
        with components() as comps:
            run(args, comps)
    except BenchError as exc:
        fail(script, str(exc))
    except OSError as exc:
        fail(script, f"a benchmark connection failed: {exc}")


# --------------------------------------------------------------------------- HAProxy


def haproxy_config(mode: str, listen: tuple[str, int], server: tuple[str, int],
                   threads: int) -> str:
    """A one-frontend, one-server HAProxy config: ``mode tcp`` or ``mode http`` (keep-alive on
    both sides, idle server connections reused by any client connection)."""
    http = mode == "http"
    lines = [
        "global",
        f"    nbthread {threads}",
        "    maxconn 4096",
        "defaults",
        f"    mode {mode}",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        *(["    option http-keep-alive", "    timeout http-keep-alive 60s"] if http else []),
        "frontend bench",
        f"    bind {listen[0]}:{listen[1]}",
        "    default_backend upstream",
        "backend upstream",
        *(["    http-reuse always"] if http else []),
        f"    server s1 {server[0]}:{server[1]}",
        "",
    ]
    return "\n".join(lines)


def start_haproxy(comps: Components, binary: str, mode: str, server: tuple[str, int],
                  threads: int) -> int:
    """Start HAProxy in the foreground in front of ``server``; the port it listens on."""
    port = free_port()
    config = comps.workdir / f"haproxy-{mode}.cfg"
    config.write_text(haproxy_config(mode, ("127.0.0.1", port), server, threads))
    comps.run(f"haproxy {mode}", [binary, "-db", "-f", str(config)], "127.0.0.1", port)
    return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- nginx


def nginx_config(workdir: Path, listen: tuple[str, int], body: str, modules_off: str) -> str:
    """nginx in the foreground, one worker, answering ``body`` to everything, keep-alive; every
    path it would write under /var is moved into ``workdir``."""
    temps = [f"    client_body_temp_path {workdir}/client_body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in modules_off:
            temps.append(f"    {module}_temp_path {workdir}/{module};")
    return "\n".join([
        "daemon off;",
        "worker_processes 1;",
        f"pid {workdir}/nginx.pid;",
        "error_log stderr warn;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        *temps,
        "    keepalive_requests 100000000;",
        "    keepalive_timeout 300s;",
        "    default_type text/plain;",
        "    server {",
        f"        listen {listen[0]}:{listen[1]} backlog=1024;",
        f'        location / {{ return 200 "{body}"; }}',
        "    }",
        "}",
        "",
    ])


def start_nginx(comps: Components, binary: str, host: str, body: str) -> int:
    """Start nginx answering ``body`` on ``host``; the port it listens on."""
    port = free_port(host)
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    config = comps.workdir / "nginx.conf"
    config.write_text(nginx_config(comps.workdir, (host, port), body, built))
    comps.run("nginx", [binary, "-e", "stderr", "-p", str(comps.workdir), "-c", str(config)],
              host, port)
    return port


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(out: str) -> WrkResult:
    """Requests/s and the p50/p99 latencies of ``wrk --latency`` output; BenchError if any
    request failed (a run with errors measures something else)."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    if not (rps and p50 and p99):
        raise BenchError(f"cannot read wrk's output:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if (errors and any(int(n) for n in errors.groups())) or non_2xx:
        raise BenchError(f"wrk saw failed requests:\n{out}")
    return WrkResult(float(rps.group(1)), _to_ms(*p50.groups()), _to_ms(*p99.groups()))


def run_wrk(binary: str, url: str, connections: int, duration: float,
            threads: int | None = None, headers: Sequence[str] = ()) -> WrkResult:
    """One wrk run: keep-alive GETs on ``connections`` connections for ``duration`` seconds
    (``headers``: added to each request; ``Connection: close`` makes each a new one)."""
    threads = threads or min(connections, os.cpu_count() or 1)
    argv = [binary, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            "--latency", "--timeout", "10s", *(a for h in headers for a in ("-H", h)), url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return parse_wrk(done.stdout)


# --------------------------------------------------------------------------- rounds and tables


@dataclass(frozen=True)
class Metric:
    """One figure measured per subject: ``key`` indexes the results."""

    key: str
    label: str
    digits: int = 0  # decimals shown


@dataclass(frozen=True)
class Baseline:
    """A subject that the others are divided by, with the ratio column's heading."""

    subject: str
    heading: str


Results = dict[tuple[str, str], list[float]]  # (metric key, subject) -> one figure per round


def rotated(items: Sequence[str], round_no: int) -> list[str]:
    """``items`` starting at ``round_no`` (mod len): no subject always goes first."""
    k = round_no % len(items)
    return [*items[k:], *items[:k]]


def paired_ratio(figures: Sequence[float], base: Sequence[float]) -> float | None:
    """The median over rounds of ``figures[r] / base[r]``: each round's subject against the
    baseline run seconds before or after it, so that what the machine did meanwhile cancels."""
    ratios = [f / b for f, b in zip(figures, base, strict=False) if b]
    return statistics.median(ratios) if ratios else None


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def results_table(title: str, metrics: Sequence[Metric], subjects: Sequence[str],
                  results: Results, baselines: Sequence[Baseline]) -> Table:
    """Median per metric and subject, the (paired) ratios to each baseline, and every round's
    figure in the order the rounds ran."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("subject")
    table.add_column("median", justify="right")
    for baseline in baselines:
        table.add_column(baseline.heading, justify="right")
    table.add_column("rounds", justify="right", style="dim")
    for m_index, metric in enumerate(metrics):
        labelled = False
        for s_index, subject in enumerate(subjects):
            figures = results.get((metric.key, subject))
            if not figures:
                continue
            ratios = []
            for baseline in baselines:
                base = results.get((metric.key, baseline.subject))
                own = baseline.subject == subject
                ratio = paired_ratio(figures, base) if base and not own else None
                ratios.append("" if ratio is None else f"{ratio:.2f}×")
            rounds = " ".join(_fmt(v, metric.digits) for v in figures)
            label = "" if labelled else metric.label  # on the metric's first row shown
            labelled = True
            table.add_row(label, subject, _fmt(statistics.median(figures), metric.digits),
                          *ratios, rounds,
                          end_section=s_index == len(subjects) - 1
                          and m_index < len(metrics) - 1)
    return table


def console() -> Console:
    """A console wide enough for the tables when the output is a file or a pipe."""
    width = shutil.get_terminal_size((120, 24)).columns
    return Console(width=max(width, 110), highlight=False)


def print_header(out: Console, script: str, lines: Sequence[str]) -> None:
    out.print(f"[bold]{script}[/bold]  {time.strftime('%Y-%m-%d %H:%M %Z')}, "
              f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}")
    for line in lines:
        out.print(f"  {line}")


def print_ratio_note(out: Console, lower_is_better: str = "") -> None:
    """How to read the ratio columns; ``lower_is_better`` names the rows where less is more."""
    out.print("[dim]ratios: each round's figure ÷ the baseline's of the same round, median over "
              "the rounds[/dim]")
    if lower_is_better:
        out.print(f"[dim]lower is better for {lower_is_better}; higher for the rest[/dim]")


def progress(text: str) -> None:
    """A progress line on stderr, so that stdout holds only the figures."""
    print(f"  {text}", file=sys.stderr, flush=True)
