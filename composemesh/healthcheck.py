"""The containers' healthcheck: one GET of a readiness endpoint on loopback, said in one line.

    python3 -m composemesh.healthcheck PORT [PATH]          (a proxy: 127.0.0.1:PORT)
    python3 -m composemesh.healthcheck unix:SOCKET [PATH]   (the pilot: its Unix socket)

Docker runs it every two seconds in every proxy and in the pilot, so it imports the standard
library's ``socket`` and nothing else: about 20 ms of CPU, against some 400 ms for the
``composemesh`` command (click, rich and the rest). With a dozen proxies on two cores the
heavy one alone kept the machine busy and its own checks timed out.

Exit 0 when the answer is ``200``; else 1, printing the endpoint's reason (its body) or why
it could not be asked: Docker keeps that line in the container's health log and ``up`` shows
it for a container that turned unhealthy.
"""

from __future__ import annotations

import socket
import sys

TIMEOUT_S = 2.0  # as the compose healthcheck's timeout: fail before Docker gives up on us


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A stream socket connected to the Unix socket at ``path`` (closed again if it fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _connect(where: int | str, host: str, timeout: float) -> socket.socket:
    if isinstance(where, str):
        return connect_unix(where, timeout)
    return socket.create_connection((host, where), timeout=timeout)


def probe(port: int | str, path: str = "/healthz/ready", host: str = "127.0.0.1",
          timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """Whether ``GET path`` on ``host:port`` (or the Unix socket at path ``port``) answers 200,
    and if not, why (one line)."""
    what = f"the health port {port}" if isinstance(port, int) else f"the socket {port}"
    try:
        with _connect(port, host, timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError as exc:
        return False, f"{what} did not answer: {exc}"
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return False, f"{what} answered no HTTP: {status_line[:80]!r}"
    if parts[1] == "200":
        return True, ""
    reason = " ".join(body.decode(errors="replace").split())
    return False, reason or f"HTTP {status_line}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or not (args[0].isdigit() or args[0].startswith("unix:")):
        print("usage: python3 -m composemesh.healthcheck PORT|unix:SOCKET [PATH]",
              file=sys.stderr)
        return 2
    target: int | str = int(args[0]) if args[0].isdigit() else args[0].removeprefix("unix:")
    ready, reason = probe(target, args[1] if len(args) > 1 else "/healthz/ready")
    if not ready:
        print(reason)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
