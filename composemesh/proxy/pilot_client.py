"""The proxy's side of the pilot protocol: long-poll for snapshots, apply them whole, ACK or NACK.

The pilot is reached on its Unix socket (``unix:///run/composemesh/pilot.sock``, in the socket
volume mounted read-only into every proxy); it knows the proxy by what the kernel says of the
socket's peer (its container), never by an address or a claim. ``http://`` URLs are for tests.

Protocol (HTTP/1.1, JSON bodies from ``composemesh.model.snapshot``):

- ``GET {pilot}/v1/snapshot?version=<last version seen, or empty>&applied=<version in force>``
  (so a pilot that restarted and lost its memory learns what each proxy serves)
  ``&cert_serial=…&cert_not_after=…`` (the certificate it holds, for ``status``), with the
  informational header ``X-Composemesh-Service``. The pilot answers ``200`` with an encoded
  Snapshot as soon as it has a version other than the one given, or ``304`` (no body) when its
  wait (about 30 s) runs out.
- ``POST {pilot}/v1/ack`` with an encoded Ack: ``ok=true`` once a snapshot is applied,
  ``ok=false`` with the reason when it was rejected (the previous one stays in force). The pilot
  answers 2xx; a 5xx or no answer makes the proxy send it again before its next poll, a 4xx
  drops it. "Last version seen" is the rejected version after a NACK, so a bad snapshot is not
  sent again until a newer one exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable

import aiohttp

from composemesh.backoff import Jitter, backoff_delay
from composemesh.errors import MeshError
from composemesh.model.snapshot import (
    ACK_PATH,
    SNAPSHOT_PATH,
    Ack,
    Snapshot,
    SnapshotError,
    decode_snapshot,
)
from composemesh.model.wire import encode

SERVICE_HEADER = "X-Composemesh-Service"
POLL_WAIT = 30.0  # the pilot holds a poll about this long before answering 304
POLL_SLACK = 15.0  # ... and we give it this much more before calling it gone
CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 5.0

log = logging.getLogger("composemesh.proxy.pilot")

# Prepares a snapshot (raising SnapshotError to reject it) and returns the commit, which must
# not fail: a snapshot is applied by every applier or by none.
Applier = Callable[[Snapshot], Callable[[], None]]
# The certificate the proxy holds now, (serial, not_after ISO 8601), or None.
Held = Callable[[], "tuple[str, str] | None"]
UNIX_SCHEME = "unix://"
UNIX_BASE = "http://composemesh-pilot"  # the Host of requests over the socket


def pilot_session(url: str, timeout: aiohttp.ClientTimeout,
                  headers: dict[str, str] | None = None) -> tuple[aiohttp.ClientSession, str]:
    """A session to the pilot at ``url`` and the base URL its requests use: a Unix socket
    (``unix:///path``) or, in tests, ``http://host:port``."""
    if url.startswith(UNIX_SCHEME):
        connector = aiohttp.UnixConnector(path=url.removeprefix(UNIX_SCHEME))
        return (aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers),
                UNIX_BASE)
    return aiohttp.ClientSession(timeout=timeout, headers=headers), url.rstrip("/")


class PilotError(MeshError):
    """The pilot could not be reached or answered outside the protocol."""


def hints(body: bytes) -> tuple[str, str]:
    """The (version, node) a snapshot claims, even one we cannot decode; "" where it has none."""
    try:
        obj = json.loads(body)
    except ValueError:
        return "", ""
    if not isinstance(obj, dict):
        return "", ""
    version = obj.get("version")
    identity = obj.get("identity")
    node = identity.get("node") if isinstance(identity, dict) else None
    return (str(version) if isinstance(version, str | int) else "",
            node if isinstance(node, str) else "")


class ConfigStore:
    """The last good snapshot, and the answer the proxy gave to the last one it was offered."""

    def __init__(self, appliers: Iterable[Applier] = ()) -> None:
        self.appliers: list[Applier] = list(appliers)
        self.snapshot: Snapshot | None = None
        self.applied_at: float | None = None
        self.last_answer: Ack | None = None
        self.seen_version = ""  # what the next poll asks past: applied or rejected

    def offer(self, body: bytes) -> Ack:
        """Decode and apply ``body`` whole, or keep the current snapshot; return the ACK or NACK."""
        snapshot: Snapshot | None = None
        try:
            snapshot = decode_snapshot(body)
            commits = [prepare(snapshot) for prepare in self.appliers]
        except SnapshotError as exc:
            answer = self._reject(snapshot, body, str(exc))
        except Exception as exc:  # a bug in an applier must not stop the config loop
            log.exception("applying snapshot failed")
            answer = self._reject(snapshot, body, f"cannot apply: {exc!r}")
        else:
            for commit in commits:
                commit()
            self.snapshot = snapshot
            self.applied_at = time.time()
            self.seen_version = snapshot.version
            answer = Ack(node=snapshot.identity.node, version=snapshot.version, ok=True)
        self.last_answer = answer
        return answer

    def _reject(self, snapshot: Snapshot | None, body: bytes, reason: str) -> Ack:
        version, node = hints(body)
        if snapshot is not None:
            version, node = snapshot.version, snapshot.identity.node
        elif self.snapshot is not None:
            node = self.snapshot.identity.node  # who the pilot last said we are
        if version:
            self.seen_version = version
        log.warning("rejected snapshot %s: %s", version or "(no version)", reason)
        return Ack(node=node, version=version, ok=False, reason=reason)


class PilotClient:
    """Keeps a ConfigStore in step with the pilot, forever; survives the pilot coming and going."""

    def __init__(
        self,
        url: str,
        store: ConfigStore,
        *,
        service: str = "",
        poll_wait: float = POLL_WAIT,
        jitter: Jitter = random.random,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        held: Held | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.held = held  # what the poll says the proxy holds
        self.store = store
        self.service = service
        self.poll_wait = poll_wait
        self.jitter = jitter  # the draw that spreads retries (backoff_delay)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.pending: Ack | None = None  # an answer not delivered yet
        self.failures = 0
        self.last_error = ""
        self.last_contact: float | None = None

    async def run(self) -> None:
        """Poll, apply, answer; on failure wait (capped exponential backoff) and try again."""
        timeout = aiohttp.ClientTimeout(
            total=self.poll_wait + POLL_SLACK, sock_connect=CONNECT_TIMEOUT)
        headers = {SERVICE_HEADER: self.service} if self.service else {}
        session, base = pilot_session(self.url, timeout, headers)
        async with session:
            while True:
                try:
                    settled = await self.exchange(session, base)
                except (aiohttp.ClientError, TimeoutError, PilotError) as exc:
                    self.failures += 1
                    self.last_error = str(exc) or type(exc).__name__
                    delay = backoff_delay(
                        self.failures, self.jitter, self.backoff_initial, self.backoff_max)
                    log.warning("pilot %s: %s; retrying in %.1fs (keeping snapshot %s)",
                                self.url, self.last_error, delay,
                                self.store.seen_version or "none")
                    await asyncio.sleep(delay)
                    continue
                self.failures = 0
                self.last_error = ""
                if not settled:
                    await asyncio.sleep(
                        backoff_delay(1, self.jitter, self.backoff_initial, self.backoff_max))

    async def exchange(self, session: aiohttp.ClientSession, url: str | None = None) -> bool:
        """One round: deliver any pending answer, long-poll once, answer what came.

        ``url``: the base of the requests (``pilot_session``'s), by default ``self.url``.
        Returns False when the next poll would only fetch the same unusable answer again.
        """
        url = url or self.url
        if self.pending is not None:
            await self._answer(session, self.pending, url)
        applied = self.store.snapshot.version if self.store.snapshot else ""
        params = {"version": self.store.seen_version, "applied": applied}
        held = self.held() if self.held is not None else None
        if held is not None:
            params["cert_serial"], params["cert_not_after"] = held
        async with session.get(url + SNAPSHOT_PATH, params=params) as response:
            if response.status == 304:
                self.last_contact = time.time()
                return True
            if response.status != 200:
                raise PilotError(f"GET {SNAPSHOT_PATH} answered {response.status}")
            body = await response.read()
        self.last_contact = time.time()
        answer = self.store.offer(body)
        await self._answer(session, answer, url)
        return bool(answer.ok or answer.version)

    async def _answer(self, session: aiohttp.ClientSession, answer: Ack, url: str) -> None:
        self.pending = answer
        async with session.post(
            url + ACK_PATH, data=encode(answer),
            headers={"Content-Type": "application/json"},
        ) as response:
            status = response.status
            if status >= 500:
                raise PilotError(f"POST {ACK_PATH} answered {status}")
        self.pending = None
        kind = "ACK" if answer.ok else "NACK"
        if 400 <= status < 500:  # refused for good: sending it again would not help
            log.warning("pilot refused %s of snapshot %s (%s)", kind, answer.version, status)
            return
        log.info("%s snapshot %s", kind, answer.version)
