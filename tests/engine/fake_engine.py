"""A stand-in for the Docker engine's API on a Unix socket, for the Docker SDK calls of
``engine.docker_host`` (the real engine cannot be run in the unit tests).

It answers what ``docker_host`` asks, from what a test puts in it: the container list
(filtered by labels as the engine filters), a container's inspect document, its logs, and
exec: ``exec_create`` keeps the command and its environment, ``exec_start`` hijacks the
connection as the engine does (101 UPGRADED, then stdout and stderr multiplexed in frames, then
the end), running the command as ``on_exec`` says. Every call is logged as (method, path,
query).
"""

from __future__ import annotations

import json
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "1.45"
# (container, cmd, the environment the exec adds) -> (exit code, stdout, stderr)
Exec = Callable[[str, list[str], dict[str, str]], tuple[int, bytes, bytes]]


@dataclass
class Engine:
    """What the fake engine knows: containers (as listed and as inspected) and their logs."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # GET /containers/json
    inspect: dict[str, dict[str, Any]] = field(default_factory=dict)  # by ID or name
    logs: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)  # (stream, data)
    on_exec: Exec | None = None
    calls: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    execs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, cid: str, name: str, labels: dict[str, str], running: bool = True,
            **inspect: Any) -> None:
        self.rows.insert(0, {"Id": cid, "Names": [f"/{name}"], "Labels": labels,
                             "State": "running" if running else "exited"})
        doc = {"Id": cid, "Name": f"/{name}", "Config": {"Tty": False, "Labels": labels},
               **inspect}
        self.inspect[cid] = self.inspect[name] = doc

    def find(self, key: str) -> dict[str, Any] | None:
        """A container by name, ID, or a prefix of its ID (a short ID), as the engine finds it."""
        if key in self.inspect:
            return self.inspect[key]
        found = [doc for cid, doc in self.inspect.items() if len(cid) == 64 and cid.startswith(key)]
        return found[0] if len(found) == 1 else None

    def listed(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = json.loads(query.get("filters", ["{}"])[0]).get("label", [])
        every = query.get("all", ["0"])[0] in ("1", "true", "True")
        return [r for r in self.rows
                if (every or r["State"] == "running")
                and all(_has_label(r["Labels"], w) for w in wanted)]


def _has_label(labels: dict[str, str], wanted: str) -> bool:
    key, eq, value = wanted.partition("=")
    return key in labels and (not eq or labels[key] == value)


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass

    def _send(self, status: int, body: object, content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path.removeprefix(f"/v{API}")
        self.engine.calls.append((method, path, query))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null") if length else None
        parts = path.strip("/").split("/")
        if path == "/version":
            return self._send(200, {"ApiVersion": API, "Version": "26.1.0",
                                    "MinAPIVersion": "1.24"})
        if path == "/_ping":
            return self._send(200, b"OK", "text/plain")
        if path == "/containers/json":
            return self._send(200, self.engine.listed(query))
        if parts[0] == "containers" and len(parts) == 3:
            doc = self.engine.find(parts[1])
            if doc is None:
                return self._send(404, {"message": f"No such container: {parts[1]}"})
            if parts[2] == "json":
                return self._send(200, doc)
            if parts[2] == "logs":
                tail = int(query.get("tail", ["-1"])[0])
                chunks = self.engine.logs.get(parts[1], [])
                chunks = chunks[-tail:] if tail >= 0 else chunks
                return self._send(200, b"".join(frame(s, d) for s, d in chunks),
                                  "application/vnd.docker.multiplexed-stream")
            if parts[2] == "exec" and method == "POST":
                eid = uuid.uuid4().hex
                cmd = (body or {}).get("Cmd")
                env = dict(e.split("=", 1) for e in (body or {}).get("Env") or [])
                self.engine.execs[eid] = {"container": doc["Id"], "cmd": cmd, "env": env,
                                          "ExitCode": None}
                return self._send(201, {"Id": eid})
        if parts[0] == "exec" and len(parts) == 3 and parts[1] in self.engine.execs:
            run = self.engine.execs[parts[1]]
            if parts[2] == "json":
                return self._send(200, {"ExitCode": run["ExitCode"], "Running": False})
            if parts[2] == "start":
                return self._hijack(run)
        return self._send(404, {"message": f"page not found: {method} {path}"})

    def _hijack(self, run: dict[str, Any]) -> None:
        self.send_response(101, "UPGRADED")
        self.send_header("Content-Type", "application/vnd.docker.raw-stream")
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "tcp")
        self.end_headers()
        self.wfile.flush()
        # The engine's answer comes once the process has started, well after the upgrade's
        # head; the SDK reads the stream from the raw socket under the response's buffer, so
        # bytes sent in the same segment as the head would be lost to that buffer.
        time.sleep(0.05)
        assert self.engine.on_exec is not None, "an exec nobody expected"
        code, out, err = self.engine.on_exec(run["container"], run["cmd"], run["env"])
        run["ExitCode"] = code
        self.wfile.write((frame(1, out) if out else b"") + (frame(2, err) if err else b""))
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 (the base's naming)
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextmanager
def serve(sock: Path, engine: Engine) -> Iterator[str]:
    """The fake engine on ``sock``; yields the ``DOCKER_HOST`` that reaches it."""
    handler = type("Handler", (_Handler,), {"engine": engine})
    server = _Server(str(sock), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"unix://{sock}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
