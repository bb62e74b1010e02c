"""A test double of the pilot's proxy-facing API (long-poll snapshots, ACK/NACK).

It stands in for the real pilot (``composemesh/pilot``), whose mesh state (and so whom it
attests) comes from the Docker engine, and which cannot be told to fail on cue: the double
serves any caller and scripts refusals, lost ACKs and bad statuses, so these tests exercise
the proxy's side of the protocol alone: on a Unix socket, as the pilot serves it
(``start_unix``), or on 127.0.0.1 (``start``). (test_pilot_client.py also polls the real
pilot's app once, in-process.)
Run as a script it serves one fixed snapshot: ``python pilot_double.py PORT|unix:PATH NODE
SERVICE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass

from aiohttp import web

from composemesh.model.snapshot import ACK_PATH, SNAPSHOT_PATH, Ack, ProxyIdentity, Snapshot
from composemesh.model.wire import decode, encode


def snapshot_body(version: str, node: str = "shop-web-netns-1", service: str = "web",
                  compose_service: str = "web-v1", subset: str = "v1") -> bytes:
    identity = ProxyIdentity(node=node, project="shop", compose_service=compose_service,
                             service=service, version=subset)
    return encode(Snapshot(version=version, identity=identity))


@dataclass
class Poll:
    version: str
    service_header: str | None
    held: tuple[str, str] | None = None  # the certificate the proxy says it holds


class PilotDouble:
    """Serves whatever was last published; records every poll and every answer."""

    def __init__(self, hold: float = 0.3) -> None:
        self.hold = hold  # how long a poll waits for a change before 304 (the pilot: ~30 s)
        self.current: tuple[str, bytes] | None = None
        self.polls: list[Poll] = []
        self.answers: list[Ack] = []
        self.log: list[str] = []  # "poll <version>", "refused", "ACK <v>"/"NACK <v>", in order
        self.fail_answers = 0  # answer the next N ACK/NACK posts with 503
        self.refuse_answers = 0  # ... with 403, as the pilot does for a node it does not know
        self.poll_status: int | None = None  # answer polls with this status instead
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def publish(self, version: str, body: bytes) -> None:
        self.current = (version, body)
        self._changed.set()
        self._changed = asyncio.Event()

    async def _snapshot(self, request: web.Request) -> web.Response:
        seen = request.query.get("version", "")
        serial = request.query.get("cert_serial")
        held = (serial, request.query.get("cert_not_after", "")) if serial is not None else None
        self.polls.append(Poll(seen, request.headers.get("X-Composemesh-Service"), held))
        self.log.append(f"poll {seen}")
        if self.poll_status is not None:
            return web.Response(status=self.poll_status)
        if self.current is None or self.current[0] == seen:
            try:
                await asyncio.wait_for(self._changed.wait(), self.hold)
            except TimeoutError:
                return web.Response(status=304)
        assert self.current is not None
        return web.Response(body=self.current[1], content_type="application/json")

    async def _ack(self, request: web.Request) -> web.Response:
        if self.fail_answers:
            self.fail_answers -= 1
            self.log.append("refused")
            return web.Response(status=503)
        if self.refuse_answers:
            self.refuse_answers -= 1
            self.log.append("forbidden")
            return web.Response(status=403)
        answer = decode(await request.read(), Ack)
        self.answers.append(answer)
        self.log.append(f"{'ACK' if answer.ok else 'NACK'} {answer.version}")
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(SNAPSHOT_PATH, self._snapshot)
        app.router.add_post(ACK_PATH, self._ack)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def start_unix(self, path: str, mode: int = 0o600) -> str:
        """Serve on the Unix socket at ``path`` (a socket left there is replaced), as the pilot
        serves its API; returns the ``unix://`` URL a proxy is given."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()
        os.chmod(path, mode)
        return f"unix://{path}"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


async def _serve_forever(where: str, node: str, service: str) -> None:
    pilot = PilotDouble(hold=5.0)
    pilot.publish("v1", snapshot_body("v1", node=node, service=service,
                                      compose_service=f"{service}-v1"))
    if where.startswith("unix:"):
        await pilot.start_unix(where.removeprefix("unix:"), mode=0o666)  # as the pilot's
    else:
        await pilot.start("127.0.0.1", int(where))
    print("pilot double ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_forever(sys.argv[1], sys.argv[2], sys.argv[3]))
