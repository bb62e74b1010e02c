"""Small programs the namespace tests run inside their namespaces (servers, clients, probes).

``python netns_tools.py serve HOST PORT``: answers each connection with "peer <ip>\\n", then
echoes. ``python netns_tools.py call HOST PORT TEXT``: sends TEXT, half-closes, prints the answer.
``python netns_tools.py get URL``: prints the status and body of a GET.
"""

from __future__ import annotations

import socket
import sys
import threading
import urllib.error
import urllib.request


def serve(host: str, port: int) -> None:
    server = socket.create_server((host, port), reuse_port=False)
    print("serving", flush=True)

    def handle(conn: socket.socket, peer: str) -> None:
        with conn:
            conn.sendall(f"peer {peer}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, addr = server.accept()
        threading.Thread(target=handle, args=(conn, addr[0]), daemon=True).start()


def call(host: str, port: int, text: str) -> None:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(text.encode())
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    sys.stdout.write(b"".join(chunks).decode())


def get(url: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    sys.stdout.write(f"{status}\n{body}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "serve":
        serve(args[0], int(args[1]))
    elif command == "call":
        call(args[0], int(args[1]), args[2])
    elif command == "get":
        get(args[0])
    else:
        raise SystemExit(f"unknown command {command!r}")
