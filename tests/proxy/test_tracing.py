"""Tracing: trace contexts read from W3C and B3 headers, the headers carried on, spans as
Zipkin v2 and OTLP JSON, and the exporter POSTing batches to a real HTTP collector."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from composemesh.model.monitoring import TracingSettings
from composemesh.proxy import tracing
from composemesh.proxy.tracing import (
    TRACE_HEADERS,
    Span,
    SpanExporter,
    TraceContext,
    http_tags,
    otlp_json,
    propagation_headers,
    trace_of,
    zipkin_json,
)

from .conftest import run_on

W3C_TRACE = "0af7651916cd43dd8448eb211c80319c"
W3C_PARENT = "b7ad6b7169203331"
W3C_SAMPLED = f"00-{W3C_TRACE}-{W3C_PARENT}-01"  # the spec's examples
W3C_UNSAMPLED = f"00-{W3C_TRACE}-00f067aa0ba902b7-00"
HOST = [(b"Host", b"reviews:9080"), (b"User-Agent", b"curl/8.5.0"), (b"Accept", b"*/*")]


def ctx_of(*headers: tuple[str, str], sampling: float = 1.0, seed: int = 7) -> TraceContext:
    pairs = HOST + [(n.encode(), v.encode()) for n, v in headers]
    return trace_of(pairs, sampling, random.Random(seed))


def is_new_trace(ctx: TraceContext) -> bool:
    return ctx.parent_id is None and len(ctx.trace_id) == 32 and ctx.trace_id != W3C_TRACE


def test_the_headers_replaced_in_a_forwarded_request() -> None:
    assert frozenset({
        b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
        b"x-b3-sampled", b"x-b3-flags", b"x-request-id"}) == TRACE_HEADERS
    assert b"tracestate" not in TRACE_HEADERS


def test_a_traceparent_is_continued_with_its_sampled_flag() -> None:
    ctx = ctx_of(("traceparent", W3C_SAMPLED), sampling=0.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.b3) == \
        (W3C_TRACE, W3C_PARENT, True, False)
    assert len(ctx.span_id) == 16 and ctx.span_id not in (W3C_PARENT, "0" * 16)
    int(ctx.span_id, 16)
    ctx = ctx_of(("traceparent", W3C_UNSAMPLED), sampling=1.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == (W3C_TRACE, "00f067aa0ba902b7", False)
    # the spec's other example; the flags' other bits do not matter, only the sampled bit
    ctx = ctx_of(("TraceParent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09"))
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == \
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    ctx = ctx_of(("traceparent", f"00-{W3C_TRACE}-{W3C_PARENT}-02"), sampling=1.0)
    assert ctx.sampled is False


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    for value in (f"01-{W3C_TRACE}-{W3C_PARENT}-01", f"cc-{W3C_TRACE}-{W3C_PARENT}-01-what-not"):
        ctx = ctx_of(("traceparent", value), sampling=0.0)
        assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == (W3C_TRACE, W3C_PARENT, True)


@pytest.mark.parametrize("value", [
    f"00-{W3C_TRACE.upper()}-{W3C_PARENT}-01",  # upper case
    f"00-{W3C_TRACE}-{W3C_PARENT.upper()}-01",
    f"00-{'0' * 32}-{W3C_PARENT}-01",  # all-zero trace id
    f"00-{W3C_TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"00-{W3C_TRACE}-{W3C_PARENT}-01-extra",  # version 00 is exactly 55 characters
    f"00-{W3C_TRACE}-{W3C_PARENT}-1",
    f"00-{W3C_TRACE[:-1]}g-{W3C_PARENT}-01",  # not hex
    f"00-{W3C_TRACE}-{W3C_PARENT}-zz",
    f"ff-{W3C_TRACE}-{W3C_PARENT}-01",  # version ff is invalid
    f"01-{W3C_TRACE}-{W3C_PARENT}-01x",  # a later version goes on only after a "-"
    f"0-{W3C_TRACE}-{W3C_PARENT}-01",
    f"00_{W3C_TRACE}_{W3C_PARENT}_01",
    "",
    "garbage",
])
def test_an_invalid_traceparent_is_treated_as_absent(value: str) -> None:
    ctx = ctx_of(("traceparent", value), sampling=0.0)
    assert is_new_trace(ctx)
    assert ctx.sampled is False  # decided anew, at sampling 0.0


def test_two_traceparent_headers_are_invalid() -> None:
    ctx = ctx_of(("traceparent", W3C_SAMPLED), ("traceparent", W3C_SAMPLED), sampling=0.0)
    assert is_new_trace(ctx) and ctx.sampled is False


B3_TRACE = "463ac35c9f6413ad48485a3953bb6124"
B3_SPAN = "a2fb4a1d1a96d312"


def test_b3_multi_headers_are_continued() -> None:
    ctx = ctx_of(("X-B3-TraceId", B3_TRACE), ("X-B3-SpanId", B3_SPAN),
                 ("X-B3-ParentSpanId", "0020000000000001"), ("X-B3-Sampled", "1"),
                 sampling=0.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.b3, ctx.b3_single) == \
        (B3_TRACE, B3_SPAN, True, True, False)
    ctx = ctx_of(("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", B3_SPAN),
                 ("x-b3-sampled", "0"), sampling=1.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == \
        ("0000000000000000463ac35c9f6413ad", B3_SPAN, False)  # 64 bits left-padded
    ctx = ctx_of(("x-b3-traceid", B3_TRACE), ("x-b3-spanid", B3_SPAN),
                 ("x-b3-sampled", "0"), ("x-b3-flags", "1"), sampling=0.0)
    assert ctx.sampled is True  # debug
    ctx = ctx_of(("x-b3-traceid", B3_TRACE), ("x-b3-spanid", B3_SPAN), ("x-b3-sampled", "d"),
                 sampling=0.0)
    assert ctx.sampled is True
    for sampling in (0.0, 1.0):  # no decision: it is made here
        ctx = ctx_of(("x-b3-traceid", B3_TRACE), ("x-b3-spanid", B3_SPAN), sampling=sampling)
        assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == (B3_TRACE, B3_SPAN, sampling == 1)


def test_b3_single_header_is_continued() -> None:
    value = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
    ctx = ctx_of(("b3", value), sampling=0.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.b3, ctx.b3_single) == \
        ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1", True, True, True)
    ctx = ctx_of(("B3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1-0"), sampling=1.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == \
        ("000000000000000064fe8b2a57d3eff7", "e457b5a2e4d86bd1", False)
    ctx = ctx_of(("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d"), sampling=0.0)
    assert ctx.sampled is True
    for sampling in (0.0, 1.0):
        ctx = ctx_of(("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1"),
                     sampling=sampling)
        assert (ctx.parent_id, ctx.sampled) == ("e457b5a2e4d86bd1", sampling == 1.0)


def test_a_b3_sampling_decision_alone_starts_a_trace_with_it() -> None:
    for value, sampling, sampled in (("0", 1.0, False), ("1", 0.0, True), ("d", 0.0, True)):
        ctx = ctx_of(("b3", value), sampling=sampling)
        assert is_new_trace(ctx) and ctx.sampled is sampled and ctx.b3_single
        ctx = ctx_of(("x-b3-sampled", value), sampling=sampling)
        assert is_new_trace(ctx) and ctx.sampled is sampled and ctx.b3 and not ctx.b3_single


@pytest.mark.parametrize("headers", [
    (("b3", f"{B3_TRACE.upper()}-{B3_SPAN}-1"),),
    (("b3", f"{B3_TRACE}-{B3_SPAN}-2"),),
    (("b3", f"{B3_TRACE}-{B3_SPAN[:-1]}-1"),),
    (("b3", f"{'0' * 32}-{B3_SPAN}-1"),),
    (("b3", f"{B3_TRACE}-{'0' * 16}-1"),),
    (("b3", f"{B3_TRACE}-{B3_SPAN}-1-xyz"),),
    (("b3", "true"),),
    (("x-b3-traceid", B3_TRACE[:20]), ("x-b3-spanid", B3_SPAN)),
    (("x-b3-traceid", B3_TRACE), ("x-b3-spanid", "nothex!!nothex!!")),
    (("x-b3-traceid", B3_TRACE),),
    (("x-b3-spanid", B3_SPAN),),
    (("x-b3-traceid", B3_TRACE), ("x-b3-spanid", B3_SPAN), ("x-b3-parentspanid", "12")),
])
def test_invalid_b3_is_treated_as_absent(headers: tuple[tuple[str, str], ...]) -> None:
    ctx = ctx_of(*headers, sampling=0.0)
    assert is_new_trace(ctx) and ctx.sampled is False
    assert ctx.b3  # the caller spoke B3, so it hears B3 back


def test_traceparent_comes_before_b3_and_single_b3_before_multi() -> None:
    ctx = ctx_of(("b3", f"{B3_TRACE}-{B3_SPAN}-0"), ("traceparent", W3C_SAMPLED))
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled, ctx.b3, ctx.b3_single) == \
        (W3C_TRACE, W3C_PARENT, True, True, True)
    ctx = ctx_of(("x-b3-traceid", "1" * 32), ("x-b3-spanid", "2" * 16),
                 ("b3", f"{B3_TRACE}-{B3_SPAN}-1"))
    assert (ctx.trace_id, ctx.parent_id, ctx.b3_single) == (B3_TRACE, B3_SPAN, True)
    ctx = ctx_of(("traceparent", "garbage"), ("x-b3-traceid", B3_TRACE),
                 ("x-b3-spanid", B3_SPAN), ("x-b3-sampled", "1"), sampling=0.0)
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == (B3_TRACE, B3_SPAN, True)


def test_new_traces_are_sampled_at_the_configured_share() -> None:
    rng = random.Random(2026)
    assert not any(trace_of(HOST, 0.0, rng).sampled for _ in range(5000))
    assert all(trace_of(HOST, 1.0, rng).sampled for _ in range(5000))
    rng = random.Random(42)
    half = sum(trace_of(HOST, 0.5, rng).sampled for _ in range(10000))
    assert 4800 <= half <= 5200
    quarter = sum(trace_of(HOST, 0.25, rng).sampled for _ in range(10000))
    assert 2300 <= quarter <= 2700


def test_ids_come_from_the_rng_given() -> None:
    one, two = trace_of(HOST, 1.0, random.Random(5)), trace_of(HOST, 1.0, random.Random(5))
    assert one == two
    assert trace_of(HOST, 1.0, random.Random(6)) != one
    rng = random.Random(5)
    ids = {trace_of(HOST, 1.0, rng).trace_id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) and i == i.lower() for i in ids)


def test_the_request_id_is_kept_when_valid_and_made_otherwise() -> None:
    assert ctx_of(("X-Request-Id", "abc-123")).request_id == "abc-123"
    assert ctx_of(("x-request-id", "a" * 128)).request_id == "a" * 128
    assert ctx_of(("x-request-id", "  !~padded~!  ")).request_id == "!~padded~!"
    for bad in ("a" * 129, "has space", "", "tab\there"):
        made = ctx_of(("x-request-id", bad)).request_id
        assert uuid.UUID(made).version == 4 and str(uuid.UUID(made)) == made
    made = trace_of(HOST + [(b"x-request-id", "caf\xe9".encode("latin-1"))], 1.0,
                    random.Random(1)).request_id
    assert uuid.UUID(made).version == 4
    made = ctx_of().request_id
    assert uuid.UUID(made).version == 4
    assert uuid.UUID(made).variant == uuid.RFC_4122


def test_propagation_headers_exact_bytes() -> None:
    t, s, p = W3C_TRACE, "1111111111111111", W3C_PARENT
    ctx = TraceContext(t, s, p, True, "req-1")
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01\r\n"
        b"x-request-id: req-1\r\n")
    ctx = TraceContext(t, s, None, False, "req-2")
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-00\r\n"
        b"x-request-id: req-2\r\n")
    ctx = TraceContext(t, s, p, True, "req-3", b3=True)
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01\r\n"
        b"x-b3-traceid: 0af7651916cd43dd8448eb211c80319c\r\n"
        b"x-b3-spanid: 1111111111111111\r\n"
        b"x-b3-parentspanid: b7ad6b7169203331\r\n"
        b"x-b3-sampled: 1\r\n"
        b"x-request-id: req-3\r\n")
    ctx = TraceContext(t, s, None, False, "req-4", b3=True)
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-00\r\n"
        b"x-b3-traceid: 0af7651916cd43dd8448eb211c80319c\r\n"
        b"x-b3-spanid: 1111111111111111\r\n"
        b"x-b3-sampled: 0\r\n"
        b"x-request-id: req-4\r\n")
    ctx = TraceContext(t, s, p, True, "req-5", b3=True, b3_single=True)
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01\r\n"
        b"b3: 0af7651916cd43dd8448eb211c80319c-1111111111111111-1-b7ad6b7169203331\r\n"
        b"x-request-id: req-5\r\n")
    ctx = TraceContext(t, s, None, False, "req-6", b3=True, b3_single=True)
    assert propagation_headers(ctx) == (
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-1111111111111111-00\r\n"
        b"b3: 0af7651916cd43dd8448eb211c80319c-1111111111111111-0\r\n"
        b"x-request-id: req-6\r\n")


def test_what_is_propagated_reads_back_as_the_child_of_this_span() -> None:
    rng = random.Random(3)
    for headers in ((("traceparent", W3C_SAMPLED),), (("b3", f"{B3_TRACE}-{B3_SPAN}-1"),),
                    (("x-b3-traceid", B3_TRACE), ("x-b3-spanid", B3_SPAN))):
        ctx = ctx_of(*headers)
        lines = propagation_headers(ctx).split(b"\r\n")[:-1]
        pairs = [tuple(line.split(b": ", 1)) for line in lines]
        assert {name for name, _ in pairs} <= TRACE_HEADERS
        child = trace_of(pairs, 0.0, rng)  # type: ignore[arg-type]
        assert (child.trace_id, child.parent_id, child.sampled, child.request_id) == \
            (ctx.trace_id, ctx.span_id, ctx.sampled, ctx.request_id)
        if ctx.b3:  # and without traceparent, B3 alone says the same
            child = trace_of([p for p in pairs if p[0] != b"traceparent"], 0.0,  # type: ignore
                             rng)
            assert (child.trace_id, child.parent_id, child.sampled) == \
                (ctx.trace_id, ctx.span_id, ctx.sampled)


def client_span(**changes: Any) -> Span:
    span = Span(
        trace_id=W3C_TRACE, span_id="1111111111111111", parent_id=W3C_PARENT,
        name="reviews.shop.svc:9080/*", kind="CLIENT", start_us=1764748181123456,
        duration_us=2345, local_service="productpage-v1.shop", local_address="172.18.0.3",
        remote_address="172.18.0.5", remote_port=15006,
        tags=http_tags(method="GET", url="http://reviews:9080/reviews/0", status_code=200,
                       response_flags="", upstream_cluster="outbound|9080|v1|reviews",
                       canonical_service="productpage", canonical_revision="v1",
                       node_id="shop-productpage-v1-1", request_id="req-1"))
    for name, value in changes.items():
        setattr(span, name, value)
    return span


def server_span() -> Span:
    return Span(trace_id=W3C_TRACE, span_id="2222222222222222", parent_id=None,
                name="reviews.shop.svc:9080/*", kind="SERVER", start_us=1764748181124000,
                duration_us=0, local_service="reviews-v1.shop", local_address="fd00::5",
                tags={"http.status_code": "503", "error": "true"})


def test_http_tags_are_istios() -> None:
    tags = client_span().tags
    assert tags == {
        "http.method": "GET", "http.url": "http://reviews:9080/reviews/0",
        "http.status_code": "200", "response_flags": "-",
        "upstream_cluster": "outbound|9080|v1|reviews",
        "istio.canonical_service": "productpage", "istio.canonical_revision": "v1",
        "node_id": "shop-productpage-v1-1", "guid:x-request-id": "req-1", "component": "proxy"}
    for status in (500, 503, 0):
        assert http_tags(method="GET", url="/", status_code=status, response_flags="UF",
                         upstream_cluster="c", canonical_service="s", canonical_revision="v",
                         node_id="n", request_id="r")["error"] == "true"
    assert "error" not in http_tags(method="GET", url="/", status_code=404, response_flags="",
                                    upstream_cluster="c", canonical_service="s",
                                    canonical_revision="v", node_id="n", request_id="r")


def test_zipkin_v2_json_exact() -> None:
    body = zipkin_json([client_span(), server_span()])
    assert json.loads(body) == [
        {"traceId": W3C_TRACE, "id": "1111111111111111", "parentId": W3C_PARENT,
         "name": "reviews.shop.svc:9080/*", "kind": "CLIENT", "timestamp": 1764748181123456,
         "duration": 2345,
         "localEndpoint": {"serviceName": "productpage-v1.shop", "ipv4": "172.18.0.3"},
         "remoteEndpoint": {"ipv4": "172.18.0.5", "port": 15006},
         "tags": client_span().tags},
        {"traceId": W3C_TRACE, "id": "2222222222222222",
         "name": "reviews.shop.svc:9080/*", "kind": "SERVER", "timestamp": 1764748181124000,
         "duration": 1,  # Zipkin's minimum
         "localEndpoint": {"serviceName": "reviews-v1.shop", "ipv6": "fd00::5"},
         "tags": {"http.status_code": "503", "error": "true"}},
    ]
    assert body.startswith(b'[{"traceId":"0af7651916cd43dd8448eb211c80319c","id":"111')
    mapped = json.loads(zipkin_json([client_span(remote_address="::ffff:10.0.0.9",
                                                 remote_port=None)]))
    assert mapped[0]["remoteEndpoint"] == {"ipv4": "10.0.0.9"}
    assert zipkin_json([]) == b"[]"


def test_otlp_json_exact() -> None:
    client, server = client_span(), server_span()
    body = json.loads(otlp_json([client, server, client_span(span_id="3333333333333333")]))

    def attrs(tags: dict[str, str], *extra: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"key": k, "value": {"stringValue": v}} for k, v in tags.items()] + list(extra)

    client_attrs = attrs(
        client.tags,
        {"key": "network.local.address", "value": {"stringValue": "172.18.0.3"}},
        {"key": "network.peer.address", "value": {"stringValue": "172.18.0.5"}},
        {"key": "network.peer.port", "value": {"intValue": "15006"}})
    client_json = {
        "traceId": W3C_TRACE, "spanId": "1111111111111111", "parentSpanId": W3C_PARENT,
        "name": "reviews.shop.svc:9080/*", "kind": 3,
        "startTimeUnixNano": "1764748181123456000", "endTimeUnixNano": "1764748181125801000",
        "attributes": client_attrs, "status": {}}
    assert body == {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name",
                                      "value": {"stringValue": "productpage-v1.shop"}}]},
         "scopeSpans": [{"scope": {"name": "composemesh"},
                         "spans": [client_json, {**client_json, "spanId": "3333333333333333"}]}]},
        {"resource": {"attributes": [{"key": "service.name",
                                      "value": {"stringValue": "reviews-v1.shop"}}]},
         "scopeSpans": [{"scope": {"name": "composemesh"}, "spans": [{
             "traceId": W3C_TRACE, "spanId": "2222222222222222",
             "name": "reviews.shop.svc:9080/*", "kind": 2,
             "startTimeUnixNano": "1764748181124000000",
             "endTimeUnixNano": "1764748181124000000",
             "attributes": attrs(server.tags, {"key": "network.local.address",
                                               "value": {"stringValue": "fd00::5"}}),
             "status": {"code": 2}}]}]},
    ]}
    assert otlp_json([]) == b'{"resourceSpans":[]}'


class Collector:
    """A real HTTP span collector: Zipkin's and OTLP's endpoints, recording every POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, bytes]] = []  # (path, content type, body)
        self.status = 202
        self.delay = 0.0
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v2/spans", self.receive)
        app.router.add_post("/v1/traces", self.receive)
        return app

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((request.path, request.headers.get("Content-Type", ""), body))
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text="{}", content_type="application/json")

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.posts) < count:
                self.arrived.clear()
                await self.arrived.wait()


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, str, str]]:
    double = Collector()
    server = TestServer(double.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield double, str(server.make_url("/api/v2/spans")), str(server.make_url("/v1/traces"))
    finally:
        await server.close()


def dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago; nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v2/spans"


def test_the_exporter_posts_both_formats_to_a_real_collector(loop_kind: str) -> None:
    spans = [client_span(), server_span(), client_span(span_id="3333333333333333")]

    async def main() -> None:
        async with collector() as (double, zipkin, otlp):
            exporter = SpanExporter(TracingSettings(zipkin=zipkin, otlp=otlp),
                                    flush_interval=0.05)
            await exporter.start()
            for span in spans:
                exporter.submit(span)
            await double.wait_for(2)
            by_path = {path: (kind, body) for path, kind, body in double.posts}
            assert by_path["/api/v2/spans"][0] == "application/json"
            assert by_path["/v1/traces"][0] == "application/json"
            assert json.loads(by_path["/api/v2/spans"][1]) == json.loads(zipkin_json(spans))
            assert json.loads(by_path["/v1/traces"][1]) == json.loads(otlp_json(spans))
            await exporter.close()
            assert (exporter.sent, exporter.failed, exporter.dropped) == (6, 0, 0)
            assert len(double.posts) == 2

    run_on(loop_kind, main())


def test_a_full_batch_goes_at_once_and_close_flushes_the_rest(loop_kind: str) -> None:
    async def main() -> None:
        async with collector() as (double, zipkin, _):
            exporter = SpanExporter(TracingSettings(zipkin=zipkin), flush_interval=60.0,
                                    max_batch=2)
            await exporter.start()
            for n in range(5):
                exporter.submit(client_span(span_id=f"{n + 1:016x}"))
            await double.wait_for(1)  # two spans: a full batch, long before the interval
            assert [s["id"] for s in json.loads(double.posts[0][2])] == \
                ["0000000000000001", "0000000000000002"]
            await exporter.close()  # the other three, in batches of two
            ids = [s["id"] for _, _, body in double.posts for s in json.loads(body)]
            assert ids == [f"{n + 1:016x}" for n in range(5)]
            assert [len(json.loads(body)) for _, _, body in double.posts] == [2, 2, 1]
            assert exporter.sent == 5

    run_on(loop_kind, main())


def test_a_down_collector_counts_failed_and_logs_once(loop_kind: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        exporter = SpanExporter(TracingSettings(zipkin=dead_url()), flush_interval=0.02)
        await exporter.start()
        exporter.submit(client_span())
        exporter.submit(client_span())
        await asyncio.sleep(0.3)
        exporter.submit(client_span())
        await asyncio.sleep(0.3)
        await exporter.close()
        assert (exporter.sent, exporter.failed, exporter.dropped) == (0, 3, 0)

    with caplog.at_level(logging.WARNING, logger="composemesh.proxy.tracing"):
        run_on(loop_kind, main())
    warnings = [r for r in caplog.records if r.name == "composemesh.proxy.tracing"]
    assert len(warnings) == 1  # two failed flushes, one warning a minute
    assert "2 spans lost" in warnings[0].getMessage()


def test_a_refusing_or_slow_collector_counts_failed_the_other_still_gets_it(
        loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "EXPORT_TIMEOUT", 0.2)

    async def main() -> None:
        async with collector() as (good, zipkin, _), collector() as (bad, _, otlp):
            bad.status = 500
            exporter = SpanExporter(TracingSettings(zipkin=zipkin, otlp=otlp),
                                    flush_interval=0.02)
            await exporter.start()
            exporter.submit(client_span())
            await good.wait_for(1)
            await bad.wait_for(1)
            await asyncio.sleep(0.05)
            assert (exporter.sent, exporter.failed) == (1, 1)
            bad.status, bad.delay = 200, 1.0  # answers after the timeout
            exporter.submit(client_span())
            await good.wait_for(2)
            await bad.wait_for(2)
            await exporter.close()
            assert (exporter.sent, exporter.failed) == (2, 2)

    run_on(loop_kind, main())


def test_update_switches_collectors_live(loop_kind: str) -> None:
    async def main() -> None:
        async with collector() as (double, zipkin, otlp):
            exporter = SpanExporter(TracingSettings(zipkin=zipkin), flush_interval=0.02)
            await exporter.start()
            exporter.submit(client_span())
            await double.wait_for(1)
            exporter.update(TracingSettings(otlp=otlp))
            exporter.submit(client_span())
            await double.wait_for(2)
            await exporter.close()
            assert [path for path, _, _ in double.posts] == ["/api/v2/spans", "/v1/traces"]
            assert exporter.sent == 2

    run_on(loop_kind, main())


def test_a_full_queue_drops_and_counts() -> None:
    exporter = SpanExporter(TracingSettings(zipkin="http://127.0.0.1:9/"), max_queue=3)
    for _ in range(5):
        exporter.submit(client_span())
    assert exporter.dropped == 2
    assert (exporter.sent, exporter.failed) == (0, 0)


def test_spans_that_find_no_collector_are_dropped_and_counted(loop_kind: str) -> None:
    async def main() -> None:
        async with collector() as (double, zipkin, _):
            exporter = SpanExporter(TracingSettings(zipkin=zipkin), flush_interval=0.02)
            await exporter.start()
            exporter.update(TracingSettings())  # tracing switched off under it
            exporter.submit(client_span())
            exporter.submit(client_span())
            await asyncio.sleep(0.1)
            await exporter.close()
            await exporter.close()  # twice is harmless
            assert (exporter.sent, exporter.failed, exporter.dropped) == (0, 0, 2)
            assert double.posts == []

    run_on(loop_kind, main())


def test_an_exporter_never_started_closes_quietly() -> None:
    exporter = SpanExporter(TracingSettings(otlp="http://127.0.0.1:9/v1/traces"))
    exporter.submit(client_span())
    asyncio.run(exporter.close())
    assert (exporter.sent, exporter.failed, exporter.dropped) == (0, 0, 1)
