"""Demo workloads for composemesh's examples and tests: stdlib only, one role per process.

    demo.py productpage|reviews|ratings   HTTP/1.1 servers on :9080 (PORT)
    demo.py details                        a raw TCP line service on :9000 (PORT)
    demo.py get URL [--count N] [-H K:V]   an HTTP client: prints one JSON line per answer
    demo.py tcp HOST PORT LINE             a TCP client: prints the answer line

They know nothing of the mesh: they call `reviews:9080` and `details:9000` as any app would.
Env: VERSION (reviews), FAIL_EVERY=N (answer 503 on every Nth request), DELAY_MS.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("VERSION", "v1")
HOSTNAME = socket.gethostname()
FAIL_EVERY = int(os.environ.get("FAIL_EVERY", "0"))
DELAY_MS = int(os.environ.get("DELAY_MS", "0"))
# Istio's Bookinfo apps forward these (W3C trace context, B3, Envoy's request id)
FORWARDED_HEADERS = frozenset({
    "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
    "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "x-ot-span-context"})
_counter = itertools.count(1)
_lock = threading.Lock()


def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, {"body": body.decode(errors="replace")}
    finally:
        conn.close()


def tcp_line(host: str, port: int, line: str, timeout: float = 5.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(line.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data.decode().strip()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    role = "?"
    # http.server writes the head and the body apart: with Nagle on, the body waits for the
    # ACK of the head, which a keep-alive peer delays (~40 ms). A real server sends at once.
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args: object) -> None:  # quiet: tests read stdout
        pass

    def answer(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/healthz":
            return self.answer(200, {"ok": True})
        with _lock:
            n = next(_counter)
        if DELAY_MS:
            time.sleep(DELAY_MS / 1000)
        if FAIL_EVERY and n % FAIL_EVERY == 0:
            return self.answer(503, {"error": "injected by FAIL_EVERY", "host": HOSTNAME})
        try:
            status, obj = getattr(self, f"{self.role}_page")()
        except OSError as exc:
            status, obj = 502, {"error": f"{type(exc).__name__}: {exc}"}
        obj.setdefault("host", HOSTNAME)
        self.answer(status, obj)

    def forwarded(self, *more: str) -> dict[str, str]:
        """The headers an app passes on to the services it calls so that the mesh can join
        their spans into one trace: Istio's list for its Bookinfo sample, and ``more``."""
        keep = FORWARDED_HEADERS.union(more)
        return {k: v for k, v in self.headers.items() if k.lower() in keep}

    def productpage_page(self) -> tuple[int, dict]:
        headers = self.forwarded("end-user", "x-user")
        status, reviews = http_get("reviews", 9080, "/reviews/0", headers)
        details = json.loads(tcp_line("details", 9000, "0"))
        return (200 if status == 200 else 502), {
            "service": "productpage", "reviews": reviews, "details": details}

    def reviews_page(self) -> tuple[int, dict]:
        obj: dict = {"service": "reviews", "version": VERSION,
                     "reviews": ["An extremely entertaining play.", "Absolutely fun."]}
        if VERSION != "v1":
            status, ratings = http_get("ratings", 9080, "/ratings/0", self.forwarded())
            obj["ratings"] = ratings if status == 200 else {"error": status}
            obj["stars"] = "black" if VERSION == "v2" else "red"
        return 200, obj

    def ratings_page(self) -> tuple[int, dict]:
        return 200, {"service": "ratings", "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


class DetailsHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for raw in self.rfile:
            book = raw.decode().strip()
            answer = {"service": "details", "id": book, "author": "William Shakespeare",
                      "pages": 200, "host": HOSTNAME}
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class DetailsServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(role: str) -> None:
    if role == "details":
        port = int(os.environ.get("PORT", "9000"))
        DetailsServer(("0.0.0.0", port), DetailsHandler).serve_forever()
        return
    port = int(os.environ.get("PORT", "9080"))
    handler = type(f"{role}Handler", (Handler,), {"role": role})
    server = ThreadingHTTPServer(("0.0.0.0", port), handler)
    server.daemon_threads = True
    server.serve_forever()


def client_get(args: list[str]) -> int:
    url, count, headers = args[0], 1, {}
    rest = iter(args[1:])
    for flag in rest:
        if flag == "--count":
            count = int(next(rest))
        elif flag == "-H":
            key, _, value = next(rest).partition(":")
            headers[key.strip()] = value.strip()
    parts = urllib.parse.urlsplit(url)
    failures = 0
    for _ in range(count):
        try:
            status, obj = http_get(parts.hostname or "", parts.port or 80,
                                   parts.path or "/", headers)
        except OSError as exc:
            status, obj = 0, {"error": str(exc)}
        failures += status != 200
        print(json.dumps({"status": status, **obj}), flush=True)
    return 1 if failures == count else 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    role, args = argv[0], argv[1:]
    if role in ("productpage", "reviews", "ratings", "details"):
        signal_exit()
        serve(role)
        return 0
    if role == "get":
        return client_get(args)
    if role == "tcp":
        print(tcp_line(args[0], int(args[1]), args[2]))
        return 0
    print(__doc__)
    return 2


def signal_exit() -> None:
    """PID 1 in a container gets no default SIGTERM action: exit at once when stopped."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
