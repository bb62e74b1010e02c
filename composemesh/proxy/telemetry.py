"""What one proxy tells of the traffic beside its metrics: access logs and spans.

One ``Observer`` per proxy, shared by its HTTP paths and TCP forwarders, set by each snapshot's
``Telemetry`` (``apply``): whether access logs are written (one JSON line per request or TCP
connection on stdout), and where spans go (``SpanExporter``) with which share of new traces
sampled. The data path asks it for a request's trace context (``trace``) when the request
head is in, and hands it what happened when the request or connection is over (``http``,
``tcp``); nothing here runs when both are off but the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from composemesh.model.monitoring import Telemetry, TracingSettings
from composemesh.proxy.access_log import AccessLog, http_entry, tcp_entry
from composemesh.proxy.stats import UNKNOWN, PeerLabels
from composemesh.proxy.tracing import (
    TRACE_HEADERS,
    Span,
    SpanExporter,
    TraceContext,
    http_tags,
    propagation_headers,
    trace_of,
)

log = logging.getLogger("composemesh.proxy.telemetry")

REQUEST_ID = frozenset({b"x-request-id"})
CLIENT = "CLIENT"  # a span of a request the proxy sent on (outbound, the ingress)
SERVER = "SERVER"  # a span of a request the proxy took in for its app (inbound)


def _known(value: str) -> str | None:
    return None if value == UNKNOWN else value


class Observer:
    """Access logs and spans of one proxy (see the module's docstring)."""

    def __init__(self, access_log: AccessLog | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.log = access_log
        self.logging = access_log is not None  # on by default, as Telemetry says
        self.tracing: TracingSettings | None = None
        self.exporter: SpanExporter | None = None
        self.rng = rng or random.Random()
        self._starting: asyncio.Task[None] | None = None

    # ---- configuration, per snapshot

    def apply(self, telemetry: Telemetry) -> None:
        """Take a snapshot's ``telemetry``: access logs on or off, collectors and sampling."""
        self.logging = telemetry.access_log and self.log is not None
        tracing = telemetry.tracing
        self.tracing = tracing
        if tracing is None:
            return
        if self.exporter is None:
            self.exporter = SpanExporter(tracing)
            with contextlib.suppress(RuntimeError):  # no loop: started by ``start``
                self._starting = asyncio.get_running_loop().create_task(self.exporter.start())
        else:
            self.exporter.update(tracing)

    async def start(self) -> None:
        if self.exporter is not None and self._starting is None:
            await self.exporter.start()

    async def close(self) -> None:
        if self.exporter is not None:
            if self._starting is not None:
                await asyncio.gather(self._starting, return_exceptions=True)
            await self.exporter.close()
        if self.log is not None:
            self.log.close()

    # ---- per request

    def trace(self, pairs: list[tuple[bytes, bytes]]) -> tuple[TraceContext, frozenset[bytes],
                                                                 bytes]:
        """A request's trace context, the request headers the forwarded head drops, and the
        ones it adds: with tracing on, the trace continued (or started) with this proxy's
        span (``traceparent``, B3 as the caller used it) and ``x-request-id``; with tracing
        off, only ``x-request-id`` (the caller's, or a new one): trace headers pass as
        they came, so an app's own tracer decides."""
        tracing = self.tracing
        ctx = trace_of(pairs, tracing.sampling if tracing is not None else 0.0, self.rng)
        if tracing is not None:
            return ctx, TRACE_HEADERS, propagation_headers(ctx)
        return ctx, REQUEST_ID, b"x-request-id: %s\r\n" % ctx.request_id.encode()

    def http(self, ctx: TraceContext, *, kind: str, wall: float, duration_ms: float,
             method: str, path: str, authority: str, user_agent: str | None,
             forwarded_for: str | None, status: int, flags: str, bytes_received: int,
             bytes_sent: int, upstream: str | None, cluster: str, local: str, remote: str,
             me: PeerLabels, source: PeerLabels, service: str, destination: PeerLabels,
             security: str | None, node: str, port: int) -> None:
        """One request over: its access-log line, its span (if sampled and tracing is on)."""
        inbound = kind == SERVER
        traced = self.tracing is not None or ctx.parent_id is not None
        if self.logging:
            assert self.log is not None
            self.log.write(http_entry(
                start_time=wall, method=method, path=path, protocol="HTTP/1.1",
                response_code=status, response_flags=flags, bytes_received=bytes_received,
                bytes_sent=bytes_sent, duration=int(duration_ms), x_forwarded_for=forwarded_for,
                user_agent=user_agent, request_id=ctx.request_id, authority=authority,
                upstream_host=upstream, upstream_cluster=cluster,
                downstream_local_address=local, downstream_remote_address=remote,
                reporter="destination" if inbound else "source",
                trace_id=ctx.trace_id if traced else None,
                source_workload=_known(source.workload),
                source_principal=_known(source.principal),
                destination_service=service, destination_workload=_known(destination.workload),
                destination_principal=_known(destination.principal),
                connection_security_policy=security))
        exporter = self.exporter
        if exporter is None or self.tracing is None or not ctx.sampled:
            return
        remote_host, _, remote_port = remote.rpartition(":")
        exporter.submit(Span(
            trace_id=ctx.trace_id, span_id=ctx.span_id, parent_id=ctx.parent_id,
            name=f"{authority or service}/*" if ":" in authority else f"{service}:{port}/*",
            kind=kind, start_us=int(wall * 1_000_000), duration_us=int(duration_ms * 1000),
            local_service=f"{me.workload}.{me.namespace}",
            local_address=local.rpartition(":")[0] or local,
            remote_address=(remote_host if inbound else (upstream or "").rpartition(":")[0]),
            remote_port=(int(remote_port) if inbound and remote_port.isdigit() else None),
            tags=http_tags(method=method, url=f"http://{authority or service}{path}",
                           status_code=status, response_flags=flags, upstream_cluster=cluster,
                           canonical_service=me.app, canonical_revision=me.version,
                           node_id=node, request_id=ctx.request_id)))

    def refused(self, *, status: int, flags: str, reporter: str, source: PeerLabels,
                service: str, destination: PeerLabels, security: str | None, local: str,
                remote: str) -> None:
        """A request refused before its head was whole or sane (no method, path or trace
        to tell): its access-log line, with the status the client got."""
        if not self.logging:
            return
        assert self.log is not None
        self.log.write(http_entry(
            start_time=time.time(), method="", path="", protocol="HTTP/1.1",
            response_code=status, response_flags=flags, bytes_received=0, bytes_sent=0,
            duration=0, downstream_local_address=local, downstream_remote_address=remote,
            reporter=reporter, source_workload=_known(source.workload),
            source_principal=_known(source.principal), destination_service=service,
            destination_workload=_known(destination.workload),
            destination_principal=_known(destination.principal),
            connection_security_policy=security))

    def tcp(self, *, wall: float, received: int, sent: int, flags: str, upstream: str | None,
            cluster: str, local: str, remote: str, reporter: str, source: PeerLabels,
            service: str, destination: PeerLabels, security: str) -> None:
        """One TCP connection over: its access-log line."""
        if not self.logging:
            return
        assert self.log is not None
        self.log.write(tcp_entry(
            start_time=wall, duration=int((time.time() - wall) * 1000), bytes_received=received,
            bytes_sent=sent, response_flags=flags, upstream_host=upstream,
            upstream_cluster=cluster, downstream_local_address=local,
            downstream_remote_address=remote, reporter=reporter,
            source_workload=_known(source.workload), source_principal=_known(source.principal),
            destination_service=service, destination_workload=_known(destination.workload),
            destination_principal=_known(destination.principal),
            connection_security_policy=security))


def address_text(address: object) -> str:
    """``ip:port`` of a socket address as the transport gives it ("" if none)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return ""


def cluster_name(direction: str, port: int, version: str, service: str) -> str:
    """Envoy's cluster name as Istio writes it: ``outbound|9080|v1|reviews``,
    ``inbound|9080||``."""
    if direction == "inbound":
        return f"inbound|{port}||"
    return f"outbound|{port}|{'' if version == UNKNOWN else version}|{service}"
