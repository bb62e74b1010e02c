"""The east-west gateway's listener: sidecars on other Docker hosts reaching this project.

The gateway is the composemesh proxy in another role (``COMPOSEMESH_GATEWAY=east-west``),
as Istio's east-west gateway in ``AUTO_PASSTHROUGH`` and Consul's mesh gateway: it never
ends TLS and holds no key for it. A remote sidecar connects to ``PORT_EAST_WEST`` and
starts mTLS naming its target in the ClientHello's SNI (``model.east_west``). The gateway
reads that name from the first bytes (``proxy.sni``), checks it (this project, this trust
domain, a service and version with LOCAL endpoints, a port the proxies do not serve), picks
an endpoint round robin (the next one when a connect fails, up to ``CONNECT_ATTEMPTS``),
opens plain TCP to ``<endpoint>:<port>`` (its own connections are not captured: it runs as
the proxy's uid), writes the hello and splices. The endpoint's sidecar captures that
connection inbound and ends the mTLS, seeing the remote caller's certificate.

Bounded: the ClientHello within ``MAX_HELLO`` bytes and ``hello_timeout`` seconds, else
closed. Anything refused is closed at once, nothing written, counted by reason
(``EastWestGateway.refused``; in the proxy's inbound errors as ``no_route`` or
``connect_failed``, the kinds ``proxy.stats`` has). Spliced connections are counted with the TCP
counters, reporter "destination" (the gateway is on the destination's side), labelled with
the target service and version. One JSON line per connection on stdout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any, cast

from composemesh.model import wellknown as wk
from composemesh.model.east_west import GatewayTarget, parse_sni
from composemesh.proxy.egress import LogLine, print_line
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.sni import NEED_MORE, client_hello_sni
from composemesh.proxy.stats import INBOUND, REPORTER, PeerLabels, ProxyStats, TcpLabels
from composemesh.proxy.tcp import Held, abort_pipes, splice

log = logging.getLogger("composemesh.proxy.east_west")

MAX_HELLO = 16 * 1024  # the ClientHello must come within this many bytes
HELLO_TIMEOUT = 10.0  # ... and within this many seconds of the accept
CONNECT_TIMEOUT = 5.0  # per endpoint
CONNECT_ATTEMPTS = 3
FORBIDDEN_PORTS = frozenset((*wk.PROXY_PORTS, wk.PORT_EAST_WEST))
GATEWAYS = frozenset((wk.EAST_WEST_GATEWAY, wk.EGRESS_GATEWAY, wk.INGRESS_GATEWAY))
_LOOPBACK = ("127.", "::1", "0.0.0.0", "::")  # noqa: S104 (a refusal list)

# refusal reasons (counted, and the outcome of the log line)
NOT_TLS = "not_tls"
NO_SNI = "no_sni"
BAD_SNI = "bad_sni"  # a name, not of the east-west form
OTHER_PROJECT = "other_project"
OTHER_TRUST_DOMAIN = "other_trust_domain"
PROXY_PORT = "proxy_port"
NO_ENDPOINT = "no_endpoint"  # no local endpoint of that service and version
HELLO_TIMED_OUT = "hello_timeout"
HELLO_TOO_LARGE = "hello_too_large"
CONNECT_FAILED = "connect_failed"


class EastWestSession(asyncio.Protocol):
    """One remote sidecar's connection: its ClientHello's SNI, then a pipe to an endpoint."""

    def __init__(self, gateway: EastWestGateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.peer = ""
        self.started = time.monotonic()
        self.sni = self.service = self.version = self.endpoint = ""
        self.sent = self.received = 0  # to the endpoint, back to the caller
        self.waiting: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        peer = t.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        self.waiting = asyncio.get_running_loop().call_later(
            self.gateway.hello_timeout, self._refuse, HELLO_TIMED_OUT)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.head += data
        name = client_hello_sni(bytes(self.head[:MAX_HELLO + 1]))
        if name is NEED_MORE:
            if len(self.head) > MAX_HELLO:
                self._refuse(HELLO_TOO_LARGE)
            return
        if name is None:
            self._refuse(NOT_TLS if self.head[:1] != b"\x16" else NO_SNI)
            return
        assert isinstance(name, str)
        if len(self.head) > MAX_HELLO:  # a hello that only ends past the bound
            self._refuse(HELLO_TOO_LARGE)
            return
        self.sni = name
        target = parse_sni(name)
        reason = self.gateway.check(target)
        if reason:
            self._refuse(reason)
            return
        assert target is not None
        self.service, self.version = target.service, target.version
        self._stop_waiting()
        self.done = True
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect(target, bytes(self.head)))

    def eof_received(self) -> bool | None:
        if not self.done:
            self._refuse(NOT_TLS if not self.head else HELLO_TOO_LARGE
                         if len(self.head) > MAX_HELLO else "incomplete_hello")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None

    def _refuse(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._stop_waiting()
        self.gateway.count(reason)
        self.gateway.log_line(self._record(reason))
        if self.transport is not None:
            self.transport.abort()

    def _record(self, outcome: str) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "gateway": wk.EAST_WEST_GATEWAY, "peer": self.peer, "sni": self.sni,
            "service": self.service, "version": self.version, "endpoint": self.endpoint,
            "outcome": outcome, "bytes_sent": self.sent, "bytes_received": self.received,
            "duration_ms": round((time.monotonic() - self.started) * 1000.0, 1),
        }

    async def _connect(self, target: GatewayTarget, hello: bytes) -> None:
        transport = self.transport
        assert transport is not None
        gateway = self.gateway
        loop = asyncio.get_running_loop()
        for address in gateway.candidates(target):
            try:
                async with asyncio.timeout(gateway.connect_timeout):
                    upstream, held = await loop.create_connection(Held, address, target.port)
            except (OSError, TimeoutError) as exc:
                log.info("east-west to %s:%d failed: %s", address, target.port, exc)
                continue
            if transport.is_closing():
                upstream.abort()
                return
            self.endpoint = f"{address}:{target.port}"
            self._splice(transport, upstream, hello, bytes(held.first), target)
            return
        gateway.count(CONNECT_FAILED)
        gateway.log_line(self._record(CONNECT_FAILED))
        transport.abort()

    def _splice(self, down: asyncio.Transport, up: asyncio.Transport, hello: bytes,
                first: bytes, target: GatewayTarget) -> None:
        gateway = self.gateway
        counters = gateway.stats.tcp(gateway.labels(target))
        counters.opened += 1

        def ended(flags: str) -> None:
            counters.closed += 1
            outcome = "ok" if flags in ("", "-") else {"DC": "downstream_reset",
                                                      "UC": "upstream_reset"}.get(flags, flags)
            gateway.log_line(self._record(outcome))

        pa, pb = splice(down, up, hello, first, gateway.pipes, ended=ended)
        self.sent, self.received = len(hello), len(first)
        counters.received += len(hello)
        counters.sent += len(first)
        to_endpoint, to_caller = pa.forward, pb.forward

        def sending(data: bytes) -> None:
            self.sent += len(data)
            counters.received += len(data)
            to_endpoint(data)

        def receiving(data: bytes) -> None:
            self.received += len(data)
            counters.sent += len(data)
            to_caller(data)

        pa.forward, pb.forward = sending, receiving


class EastWestGateway:
    """The east-west listener's state: the routers in force (their table names the local
    endpoints), the project and trust domain it serves, the stats, the open pipes."""

    def __init__(self, switch: RouterSwitch, stats: ProxyStats, log_line: LogLine = print_line,
                 *, project: Callable[[], str] | None = None,
                 trust_domain: Callable[[], str] | None = None,
                 own_addresses: Collection[str] = (),
                 allow_loopback: bool = False,
                 hello_timeout: float = HELLO_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.switch = switch
        self.stats = stats
        self.log_line = log_line
        # from the snapshot in force unless given (tests)
        self.project = project or (lambda: switch.current.inbound.me.namespace)
        self.trust_domain = trust_domain or (lambda: switch.current.inbound.config.trust_domain)
        self.own_addresses = frozenset(own_addresses)
        self.allow_loopback = allow_loopback  # tests: the endpoints stand on loopback
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.pipes: set[asyncio.Protocol] = set()
        self.refused: dict[str, int] = {}  # by reason (stats.py has no east-west kinds yet)
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}

    def count(self, reason: str) -> None:
        """A refusal: by reason here, and in the proxy's inbound errors as the nearest kind
        it has (``connect_failed``, or ``no_route`` for every other reason)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.stats.error(INBOUND, CONNECT_FAILED if reason == CONNECT_FAILED else "no_route")

    def check(self, target: GatewayTarget | None) -> str:
        """Why ``target`` is refused; "" if it may pass."""
        if target is None:
            return BAD_SNI
        if target.project != self.project():
            return OTHER_PROJECT
        if target.trust_domain != self.trust_domain():
            return OTHER_TRUST_DOMAIN
        if target.port in FORBIDDEN_PORTS:
            return PROXY_PORT
        if target.service in GATEWAYS:  # the mesh's gateways are no target from outside
            return NO_ENDPOINT
        if not self._local(target):
            return NO_ENDPOINT
        return ""

    def _local(self, target: GatewayTarget) -> list[str]:
        """The addresses of the local endpoints of the target's service and version."""
        table = self.switch.current.outbound.table
        endpoints = table.endpoints.get((target.service, target.version), ())
        if not endpoints:  # names are lower case in an SNI: find the service's own spelling
            for (service, version), eps in table.endpoints.items():
                if service.lower() == target.service and version.lower() == target.version:
                    endpoints = eps
                    break
        return [ep.address for ep in endpoints
                if not getattr(ep, "remote", False)
                and getattr(ep, "locality", "local") != "remote"
                and ep.address not in self.own_addresses
                and (self.allow_loopback or not ep.address.startswith(_LOOPBACK))]

    def candidates(self, target: GatewayTarget) -> list[str]:
        """Up to ``CONNECT_ATTEMPTS`` local endpoint addresses, round robin from the next."""
        addresses = self._local(target)
        if not addresses:
            return []
        turn = next(self._turns.setdefault((target.service, target.version), itertools.count()))
        start = turn % len(addresses)
        ordered = addresses[start:] + addresses[:start]
        return ordered[:CONNECT_ATTEMPTS]

    def labels(self, target: GatewayTarget) -> TcpLabels:
        project = target.project
        return TcpLabels(
            reporter=REPORTER[INBOUND],
            destination=PeerLabels(namespace=project, app=target.service,
                                   version=target.version),
            destination_service=f"{target.service}.{project}.svc.{target.trust_domain}",
            destination_service_name=target.service,
            destination_service_namespace=project,
            connection_security_policy="mutual_tls")

    def close(self) -> None:
        abort_pipes(self.pipes)


async def start_east_west(gateway: EastWestGateway, *, host: str = "0.0.0.0",  # noqa: S104
                          port: int = wk.PORT_EAST_WEST) -> asyncio.Server:
    """The east-west gateway's SNI listener (TLS passes through it, never ends here)."""
    server = await asyncio.get_running_loop().create_server(
        lambda: EastWestSession(gateway), host, port, backlog=1024)
    log.info("east-west: SNI passthrough on %s:%d", host, port)
    return server
