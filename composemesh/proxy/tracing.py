"""Distributed tracing: a request's trace context from its headers (W3C traceparent, B3), the
headers that carry it on, spans as Zipkin v2 and OTLP/HTTP JSON, and the batching exporter.

Everything but ``SpanExporter`` is pure. The proxy calls ``trace_of`` once per request with
the headers httptools gave it, drops every name in ``TRACE_HEADERS`` from the forwarded head
and appends ``propagation_headers(ctx)`` instead; when the request is done it builds a
``Span`` and hands it to ``SpanExporter.submit`` (sampled requests only). ``tracestate``
passes through untouched.

- W3C Trace Context level 1 (https://www.w3.org/TR/trace-context/): version ``00`` is exactly
  55 characters; a later version is read by its first four fields; ``ff``, upper case, non-hex
  and all-zero ids are invalid, and so are two ``traceparent`` headers.
- B3 (https://github.com/openzipkin/b3-propagation): the single ``b3`` header, checked first,
  then the multi-header form. A 64-bit trace id is left-padded to 128 bits. ``d`` and
  ``x-b3-flags: 1`` (debug) count as sampled. A context without a sampling decision is
  decided here, as a new trace is.
- An invalid header is treated as absent, never as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from composemesh.model.monitoring import TracingSettings

log = logging.getLogger("composemesh.proxy.tracing")

# Names the proxy replaces in a forwarded request (lower case).
TRACE_HEADERS: frozenset[bytes] = frozenset({
    b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
    b"x-b3-sampled", b"x-b3-flags", b"x-request-id",
})

_TP, _B3, _TID, _SID, _PSID, _SAMPLED, _FLAGS, _RID = range(8)
_SLOT = {b"traceparent": _TP, b"b3": _B3, b"x-b3-traceid": _TID, b"x-b3-spanid": _SID,
         b"x-b3-parentspanid": _PSID, b"x-b3-sampled": _SAMPLED, b"x-b3-flags": _FLAGS,
         b"x-request-id": _RID}

_TRACEPARENT_00 = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}").fullmatch
# A later version: the first four fields, then the end or a "-" and whatever that version adds.
_TRACEPARENT_ANY = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"
                              rb"(?:-|\Z)").match
_B3_SINGLE = re.compile(rb"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})"
                        rb"(?:-([01d])(?:-([0-9a-f]{16}))?)?").fullmatch
_HEX_TRACE = re.compile(rb"[0-9a-f]{32}|[0-9a-f]{16}").fullmatch
_HEX_SPAN = re.compile(rb"[0-9a-f]{16}").fullmatch
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}").fullmatch
_ODD_HEX = frozenset(bytes([c]) for c in b"13579bdf")  # the low flags digit: sampled bit set
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_PAD = "0" * 16
_B3_SAMPLED = {b"1": True, b"d": True, b"true": True, b"0": False, b"false": False}
_V4_VARIANT_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_VARIANT_SET = (0x4000 << 64) | (0x8000 << 48)


class TraceContext:
    """One request's place in its trace, as this proxy forwards it.

    ``span_id`` is this proxy's own new span, ``parent_id`` the caller's span (None when this
    proxy starts the trace). ``b3`` says the caller spoke B3, so B3 goes on too: the single
    ``b3`` header when ``b3_single``, else the multi-header form.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "request_id", "b3",
                 "b3_single")

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, sampled: bool,
                 request_id: str, b3: bool = False, b3_single: bool = False) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.request_id = request_id
        self.b3 = b3
        self.b3_single = b3_single

    def __repr__(self) -> str:
        return (f"TraceContext(trace_id={self.trace_id!r}, span_id={self.span_id!r}, "
                f"parent_id={self.parent_id!r}, sampled={self.sampled!r}, "
                f"request_id={self.request_id!r}, b3={self.b3!r}, b3_single={self.b3_single!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceContext):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def trace_of(pairs: list[tuple[bytes, bytes]], sampling: float,
             rng: random.Random) -> TraceContext:
    """The trace context of a request with headers ``pairs`` (names in any case): the caller's
    trace continued (traceparent first, then B3), else a new one sampled with probability
    ``sampling``; the caller's ``x-request-id`` kept if it is 1-128 visible ASCII characters."""
    found: list[bytes | None] = [None] * 8
    traceparents = 0
    slot_of = _SLOT.get
    for name, value in pairs:
        slot = slot_of(name.lower())  # cheaper than trying the name as sent first
        if slot is None:
            continue
        if slot == _TP:
            traceparents += 1
        if found[slot] is None:
            found[slot] = value.strip()

    span_id = _new_span_id(rng)
    raw_id = found[_RID]
    if raw_id is not None and _REQUEST_ID(raw_id):
        request_id = raw_id.decode("ascii")
    else:
        request_id = _uuid4(rng)
    b3_single = found[_B3] is not None
    b3 = (b3_single or found[_TID] is not None or found[_SID] is not None
          or found[_SAMPLED] is not None or found[_FLAGS] is not None
          or found[_PSID] is not None)

    traceparent = found[_TP]
    if traceparents == 1 and traceparent is not None:
        parsed = _traceparent(traceparent)
        if parsed is not None:
            trace_id, parent_id, sampled = parsed
            return TraceContext(trace_id, span_id, parent_id, sampled, request_id, b3,
                                b3_single)

    decision: bool | None = None
    single = found[_B3]
    if single is not None:
        if single in _B3_SAMPLED and len(single) == 1:
            decision = _B3_SAMPLED[single]
        else:
            match = _B3_SINGLE(single)
            if match is not None:
                tid, sid, flag = match.group(1), match.group(2), match.group(3)
                if tid.strip(b"0") and sid != _ZERO_SPAN:
                    sampled = (rng.random() < sampling) if flag is None else flag != b"0"
                    return TraceContext(_trace_id(tid), span_id, sid.decode("ascii"), sampled,
                                        request_id, True, True)
    if decision is None:
        flags = found[_FLAGS]
        if flags == b"1":
            decision = True
        else:
            said = found[_SAMPLED]
            if said is not None:
                decision = _B3_SAMPLED.get(said)
        tid, sid, psid = found[_TID], found[_SID], found[_PSID]
        if (tid is not None and sid is not None and _HEX_TRACE(tid) and tid.strip(b"0")
                and _HEX_SPAN(sid) and sid != _ZERO_SPAN
                and (psid is None or _HEX_SPAN(psid))):
            sampled = (rng.random() < sampling) if decision is None else decision
            return TraceContext(_trace_id(tid), span_id, sid.decode("ascii"), sampled,
                                request_id, True, b3_single)

    sampled = (rng.random() < sampling) if decision is None else decision
    return TraceContext(_new_trace_id(rng), span_id, None, sampled, request_id, b3, b3_single)


def propagation_headers(ctx: TraceContext) -> bytes:
    """The header lines (each ending CRLF) that carry ``ctx`` on: ``traceparent`` with this
    proxy's span as the parent, B3 when the caller used it, and ``x-request-id``."""
    trace_id, span_id = ctx.trace_id, ctx.span_id
    flag = "1" if ctx.sampled else "0"
    text = f"traceparent: 00-{trace_id}-{span_id}-0{flag}\r\n"
    if ctx.b3:
        parent = ctx.parent_id
        if ctx.b3_single:
            if parent is None:
                text += f"b3: {trace_id}-{span_id}-{flag}\r\n"
            else:
                text += f"b3: {trace_id}-{span_id}-{flag}-{parent}\r\n"
        else:
            text += f"x-b3-traceid: {trace_id}\r\nx-b3-spanid: {span_id}\r\n"
            if parent is not None:
                text += f"x-b3-parentspanid: {parent}\r\n"
            text += f"x-b3-sampled: {flag}\r\n"
    text += f"x-request-id: {ctx.request_id}\r\n"
    return text.encode("latin-1")


def _traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, else None."""
    if value[:2] == b"00":
        if _TRACEPARENT_00(value) is None:
            return None
    else:
        match = _TRACEPARENT_ANY(value)
        if match is None or match[1] == b"ff":
            return None
    trace, parent = value[3:35], value[36:52]  # the same places in every version
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace.decode("ascii"), parent.decode("ascii"), value[54:55] in _ODD_HEX


def _trace_id(raw: bytes) -> str:
    text = raw.decode("ascii")
    return text if len(text) == 32 else _PAD + text


def _new_trace_id(rng: random.Random) -> str:
    return (rng.getrandbits(128) or 1).to_bytes(16, "big").hex()


def _new_span_id(rng: random.Random) -> str:
    return (rng.getrandbits(64) or 1).to_bytes(8, "big").hex()


def _uuid4(rng: random.Random) -> str:
    """A version-4 UUID in its usual text form, from ``rng``."""
    h = ((rng.getrandbits(128) & _V4_VARIANT_CLEAR) | _V4_VARIANT_SET).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def epoch_us() -> int:
    """Now, in epoch microseconds (a span's ``start_us``)."""
    return time.time_ns() // 1000


@dataclass(slots=True)
class Span:
    """One proxy's view of one request: a CLIENT span on the outbound side, SERVER inbound."""

    trace_id: str  # 32 lower hex
    span_id: str  # 16 lower hex
    parent_id: str | None
    name: str  # Istio's "<host>:<port>/*"
    kind: str  # "CLIENT" or "SERVER"
    start_us: int  # epoch microseconds
    duration_us: int
    local_service: str  # e.g. "reviews-v1.shop"
    local_address: str  # an IP address
    remote_address: str = ""  # an IP address, "" when unknown
    remote_port: int | None = None
    tags: dict[str, str] = field(default_factory=dict)


def http_tags(*, method: str, url: str, status_code: int, response_flags: str,
              upstream_cluster: str, canonical_service: str, canonical_revision: str,
              node_id: str, request_id: str) -> dict[str, str]:
    """A span's tags as Istio's proxies name them; ``error`` on a 5xx or no response (0)."""
    tags = {
        "http.method": method,
        "http.url": url,
        "http.status_code": str(status_code),
        "response_flags": response_flags or "-",
        "upstream_cluster": upstream_cluster,
        "istio.canonical_service": canonical_service,
        "istio.canonical_revision": canonical_revision,
        "node_id": node_id,
        "guid:x-request-id": request_id,
        "component": "proxy",
    }
    if status_code >= 500 or status_code == 0:
        tags["error"] = "true"
    return tags


_encode = msgspec.json.Encoder().encode


def _ip_key(address: str) -> tuple[str, str]:
    """Zipkin's field for an address (``ipv4``/``ipv6``); IPv4-mapped IPv6 counts as IPv4."""
    if ":" not in address:
        return "ipv4", address
    if address.startswith("::ffff:") and "." in address:
        return "ipv4", address[7:]
    return "ipv6", address


def zipkin_json(spans: Sequence[Span]) -> bytes:
    """``spans`` as a Zipkin v2 JSON list (the body of ``POST /api/v2/spans``)."""
    out = []
    for span in spans:
        item: dict[str, Any] = {"traceId": span.trace_id, "id": span.span_id}
        if span.parent_id is not None:
            item["parentId"] = span.parent_id
        item["name"] = span.name
        item["kind"] = span.kind
        item["timestamp"] = span.start_us
        item["duration"] = span.duration_us if span.duration_us >= 1 else 1
        key, ip = _ip_key(span.local_address)
        item["localEndpoint"] = {"serviceName": span.local_service, key: ip}
        if span.remote_address:
            key, ip = _ip_key(span.remote_address)
            remote: dict[str, Any] = {key: ip}
            if span.remote_port:
                remote["port"] = span.remote_port
            item["remoteEndpoint"] = remote
        item["tags"] = span.tags
        out.append(item)
    return _encode(out)


OTLP_KIND = {"SERVER": 2, "CLIENT": 3}  # SpanKind: SPAN_KIND_SERVER, SPAN_KIND_CLIENT
OTLP_STATUS_ERROR = 2  # StatusCode.STATUS_CODE_ERROR


def otlp_json(spans: Sequence[Span]) -> bytes:
    """``spans`` as an OTLP/HTTP JSON ExportTraceServiceRequest (the body of
    ``POST /v1/traces``), one ResourceSpans per local service. Ids are hex (OTLP/JSON's rule,
    not protobuf's base64), enums integers, 64-bit integers decimal strings."""
    by_service: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        attributes = [{"key": k, "value": {"stringValue": v}} for k, v in span.tags.items()]
        if span.local_address:
            attributes.append({"key": "network.local.address",
                               "value": {"stringValue": span.local_address}})
        if span.remote_address:
            attributes.append({"key": "network.peer.address",
                               "value": {"stringValue": span.remote_address}})
        if span.remote_port:
            attributes.append({"key": "network.peer.port",
                               "value": {"intValue": str(span.remote_port)}})
        item: dict[str, Any] = {"traceId": span.trace_id, "spanId": span.span_id}
        if span.parent_id is not None:
            item["parentSpanId"] = span.parent_id
        item["name"] = span.name
        item["kind"] = OTLP_KIND.get(span.kind, 0)
        item["startTimeUnixNano"] = str(span.start_us * 1000)
        item["endTimeUnixNano"] = str((span.start_us + span.duration_us) * 1000)
        item["attributes"] = attributes
        item["status"] = {"code": OTLP_STATUS_ERROR} if span.tags.get("error") == "true" else {}
        by_service.setdefault(span.local_service, []).append(item)
    return _encode({"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name",
                                      "value": {"stringValue": service}}]},
         "scopeSpans": [{"scope": {"name": "composemesh"}, "spans": items}]}
        for service, items in by_service.items()
    ]})


EXPORT_TIMEOUT = 5.0  # seconds, per POST
LOG_EVERY = 60.0  # seconds between two warnings about failing collectors
_JSON = {"Content-Type": "application/json"}


class SpanExporter:
    """Batches submitted spans and POSTs each batch to every configured collector.

    ``submit`` is O(1) and never blocks or raises: a span that finds the queue full is dropped
    and counted in ``dropped``. A flush runs every ``flush_interval`` seconds, or sooner when a
    full batch waits. Counters are per collector: a batch delivered to two collectors adds its
    size to ``sent`` twice; a collector that refuses it (non-2xx), times out (5 s) or cannot
    be reached adds its size to ``failed``; the batch is not retried. Spans that find no
    collector configured, or an exporter closed without ever starting, count as ``dropped``.
    """

    def __init__(self, settings: TracingSettings, *, flush_interval: float = 1.0,
                 max_batch: int = 512, max_queue: int = 8192) -> None:
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: deque[Span] = deque()
        self._collectors: tuple[tuple[str, Callable[[Sequence[Span]], bytes]], ...] = ()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._last_warning = float("-inf")
        self.update(settings)

    def update(self, settings: TracingSettings) -> None:
        """Send the next batches to the collectors of ``settings`` (a new snapshot)."""
        collectors: list[tuple[str, Callable[[Sequence[Span]], bytes]]] = []
        if settings.zipkin:
            collectors.append((settings.zipkin, zipkin_json))
        if settings.otlp:
            collectors.append((settings.otlp, otlp_json))
        self._collectors = tuple(collectors)

    def submit(self, span: Span) -> None:
        """Queue ``span`` for the next flush (dropped and counted if the queue is full)."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == self.max_batch and self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        """Open the HTTP session and start flushing."""
        if self._task is not None:
            return
        self._closing = False
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=EXPORT_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=8))
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="span-exporter")

    async def close(self) -> None:
        """Flush what is queued, then close the session."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            assert self._wake is not None
            self._wake.set()  # the flush under way finishes; each POST is bounded by 5 s
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            while self._queue:
                await self.flush()
            await self._session.close()
            self._session = None
        self.dropped += len(self._queue)  # never started: nobody sends these
        self._queue.clear()
        self._wake = None

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.flush_interval)
            wake.clear()
            while self._queue and not self._closing:
                await self.flush()
                if len(self._queue) < self.max_batch:
                    break

    async def flush(self) -> None:
        """POST one batch (up to ``max_batch`` spans) to every collector; never raises."""
        queue = self._queue
        if not queue:
            return
        count = min(len(queue), self.max_batch)
        batch = [queue.popleft() for _ in range(count)]
        collectors = self._collectors
        if not collectors:
            self.dropped += count
            return
        results = await asyncio.gather(*(self._post(url, encode, batch)
                                         for url, encode in collectors))
        for (url, _), error in zip(collectors, results, strict=True):
            if error is None:
                self.sent += count
            else:
                self.failed += count
                self._warn(url, error, count)

    async def _post(self, url: str, encode: Callable[[Sequence[Span]], bytes],
                    batch: list[Span]) -> str | None:
        """None when ``url`` took the batch, else why not."""
        session = self._session
        if session is None or session.closed:
            return "exporter not started"
        try:
            async with session.post(url, data=encode(batch), headers=_JSON) as response:
                if 200 <= response.status < 300:
                    await response.read()
                    return None
                return f"HTTP {response.status}"
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return f"no answer in {EXPORT_TIMEOUT:g} s"
        except Exception as error:  # a collector's failure stays here
            return f"{type(error).__name__}: {error}"

    def _warn(self, url: str, why: str, count: int) -> None:
        now = time.monotonic()
        if now - self._last_warning < LOG_EVERY:
            return
        self._last_warning = now
        log.warning("span collector %s failed (%s): %d spans lost; %d failed so far",
                    url, why, count, self.failed)
