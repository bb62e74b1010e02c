"""The example mesh on the real engine: traffic through both sidecars, and the namespace owner.

One bring-up for the module (it is the slow part); tests that disturb containers come last.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.e2e.conftest import Mesh, docker

pytestmark = pytest.mark.e2e


def opened(stats: dict, direction: str) -> int:
    return int(stats[direction]["connections_opened"])


def http_requests(stats: dict) -> int:
    """Requests the outbound HTTP path routed (HTTP is routed per request, not per connection)."""
    return int(stats["http"]["requests"])


def _inbound(stats: dict, source: str) -> int:
    """HTTP requests a proxy took in for its app from ``source`` (a mesh service)."""
    return int(stats["http_inbound"]["requests_by_source"].get(source, 0))


def sent_bytes(stats: dict, direction: str) -> int:
    return int(stats[direction]["bytes_sent"]) + int(stats[direction]["bytes_received"])


def test_up_reports_every_proxy_ready_and_in_sync(bookinfo: Mesh) -> None:
    from tests.e2e.conftest import composemesh

    proc = composemesh("status", "-p", bookinfo.project, "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    nodes = {p["compose_service"]: p for p in status["proxies"]}
    assert set(nodes) == {"productpage", "reviews-v1", "reviews-v2", "ratings", "details"}
    for row in nodes.values():
        assert row["proxy_healthy"] and row["in_sync"], row
    assert nodes["reviews-v2"]["service"] == "reviews" and nodes["reviews-v2"]["version"] == "v2"
    table = composemesh("status", "-p", bookinfo.project)
    assert table.returncode == 0 and "reviews" in table.stdout and "in sync" in table.stdout


def test_up_prints_where_to_reach_the_published_app(bookinfo: Mesh) -> None:
    assert "reach it at" in bookinfo.up_output
    assert f"127.0.0.1:{bookinfo.env['BOOKINFO_PORT']}" in bookinfo.up_output


def test_http_call_goes_through_both_sidecars(bookinfo: Mesh) -> None:
    src_before = bookinfo.proxy_stats("ratings")
    dst_before = [bookinfo.proxy_stats(s) for s in ("reviews-v1", "reviews-v2")]
    answers = bookinfo.get_json("ratings", "http://reviews:9080/reviews/0", "--count", "4")
    assert [a["status"] for a in answers] == [200] * 4
    assert {a["service"] for a in answers} == {"reviews"}
    src_after = bookinfo.proxy_stats("ratings")
    dst_after = [bookinfo.proxy_stats(s) for s in ("reviews-v1", "reviews-v2")]
    # each call was captured outbound by ratings' proxy and routed as an HTTP request ...
    assert http_requests(src_after) - http_requests(src_before) == 4
    routed = src_after["http"]["requests_by_version"]["reviews"]
    assert sum(routed.values()) >= 4
    # ... and taken inbound by the reviews instances that answered, over mutual TLS from
    # ratings' proxy (pooled keep-alive connections: fewer connections than requests)
    received = [
        _inbound(a, "ratings") - _inbound(b, "ratings")
        for a, b in zip(dst_after, dst_before, strict=True)
    ]
    assert sum(received) == 4, received
    assert all(a["http_inbound"]["requests_by_security"].get("none", 0) == 0
               for a in dst_after)


def test_raw_tcp_call_goes_through_both_sidecars(bookinfo: Mesh) -> None:
    src_before = bookinfo.proxy_stats("productpage")
    dst_before = bookinfo.proxy_stats("details")
    line = bookinfo.exec("productpage", "python3", "/app/demo.py", "tcp", "details", "9000", "7")
    answer = json.loads(line)
    assert answer["service"] == "details" and answer["id"] == "7"
    src_after = bookinfo.proxy_stats("productpage")
    dst_after = bookinfo.proxy_stats("details")
    assert opened(src_after, "outbound") > opened(src_before, "outbound")
    assert opened(dst_after, "inbound") > opened(dst_before, "inbound")
    assert sent_bytes(dst_after, "inbound") - sent_bytes(dst_before, "inbound") >= len(line)


def test_published_port_reaches_the_app_through_its_proxy(bookinfo: Mesh) -> None:
    before = bookinfo.proxy_stats("productpage")
    url = f"http://127.0.0.1:{bookinfo.env['BOOKINFO_PORT']}/"
    with urllib.request.urlopen(url, timeout=10) as resp:
        page = json.load(resp)
    assert page["service"] == "productpage"
    assert page["reviews"]["service"] == "reviews" and page["details"]["service"] == "details"
    after = bookinfo.proxy_stats("productpage")
    # in from the host through the published port, plaintext: STRICT lets the host in there
    plain = after["http_inbound"]["requests_by_security"].get("none", 0)
    assert plain > before["http_inbound"]["requests_by_security"].get("none", 0)
    assert http_requests(after) > http_requests(before)  # to reviews, over HTTP
    assert opened(after, "outbound") > opened(before, "outbound")  # to details, over TCP


def test_prometheus_endpoint_uses_istio_metric_names(bookinfo: Mesh) -> None:
    bookinfo.get_json("ratings", "http://reviews:9080/reviews/0")  # ratings calls out ...
    bookinfo.get_json("details", "http://ratings:9080/ratings/0")  # ... and is called
    text = bookinfo.prometheus("ratings")
    assert "istio_requests_total{" in text
    assert 'reporter="source"' in text and 'destination_service_name="reviews"' in text
    assert "istio_request_duration_milliseconds_bucket{" in text
    assert 'reporter="destination"' in text  # inbound: the call from details
    assert 'connection_security_policy="mutual_tls"' in text


def test_capture_rules_are_installed_in_the_namespace(bookinfo: Mesh) -> None:
    rules = bookinfo.exec("reviews-v1-netns", "iptables", "-t", "nat", "-S")
    assert "--to-ports 15001" in rules and "--to-ports 15006" in rules
    assert "--uid-owner 1337" in rules


# ---- the namespace owner: nothing below may leave an app or its proxy without network ----


def wait_until_serving(mesh: Mesh, compose_service: str, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            answers = mesh.get_json(compose_service, url)
            if answers and answers[0]["status"] == 200:
                return
            last = str(answers)
        except AssertionError as exc:
            last = str(exc)
        time.sleep(1)
    raise AssertionError(f"{compose_service} cannot reach {url} after {timeout}s: {last}")


def assert_pair_has_network(mesh: Mesh, compose_service: str) -> None:
    """The app answers through its namespace (inbound) and reaches others through its own
    proxy (outbound, counted there)."""
    wait_until_serving(mesh, "ratings", f"http://{compose_service}:9080/healthz")
    wait_until_serving(mesh, compose_service, "http://ratings:9080/ratings/0")
    before = mesh.proxy_stats(compose_service)
    inbound = mesh.get_json("ratings", f"http://{compose_service}:9080/healthz", "--count", "3")
    outbound = mesh.get_json(compose_service, "http://ratings:9080/ratings/0", "--count", "3")
    after = mesh.proxy_stats(compose_service)
    assert [a["status"] for a in inbound + outbound] == [200] * 6
    assert http_requests(after) - http_requests(before) == 3


def restart_count(container: str) -> int:
    return int(docker("inspect", "-f", "{{.RestartCount}}", container))


def test_app_crash_and_restart_keeps_network(bookinfo: Mesh) -> None:
    app = bookinfo.container("reviews-v1")
    before = restart_count(app)
    docker(
        "exec", app, "python3", "-c", "import os, signal; os.kill(1, signal.SIGTERM)", check=False
    )
    deadline = time.monotonic() + 60
    while restart_count(app) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert restart_count(app) > before, "the app did not crash and come back"
    assert_pair_has_network(bookinfo, "reviews-v1")


def test_docker_restart_of_app_keeps_network(bookinfo: Mesh) -> None:
    docker("restart", "-t", "2", bookinfo.container("reviews-v1"))
    assert_pair_has_network(bookinfo, "reviews-v1")


def test_docker_restart_of_proxy_keeps_network(bookinfo: Mesh) -> None:
    docker("restart", "-t", "2", bookinfo.container("reviews-v1-proxy"))
    assert_pair_has_network(bookinfo, "reviews-v1")


@pytest.mark.parametrize("side", ["reviews-v2", "reviews-v2-proxy"])
def test_compose_recreating_either_side_keeps_network(bookinfo: Mesh, side: str) -> None:
    old = bookinfo.container(side)
    old_id = docker("inspect", "-f", "{{.Id}}", old)
    proc = bookinfo.compose("up", "-d", "--wait", "--force-recreate", "--no-deps", side)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert docker("inspect", "-f", "{{.Id}}", bookinfo.container(side)) != old_id
    assert_pair_has_network(bookinfo, "reviews-v2")


def started_at(container: str) -> str:
    """When ``container`` last started, as text that sorts in time order (RFC 3339 with the
    fractional seconds padded to nanoseconds)."""
    stamp = docker("inspect", "-f", "{{.State.StartedAt}}", container)
    head, _, frac = stamp.rstrip("Z").partition(".")
    return f"{head}.{frac.ljust(9, '0')[:9]}"


def test_docker_restart_of_the_namespace_holder_is_healed_by_the_pilot(bookinfo: Mesh) -> None:
    """The pilot restarts what sat in the holder's old namespace: the proxy first, the app
    once the proxy is ready, so the healed app's very first request goes through the mesh
    (no retry here: on a busy machine an app back before its proxy lost its first ones)."""
    app, proxy = bookinfo.container("ratings"), bookinfo.container("ratings-proxy")
    app_started = started_at(app)
    docker("restart", "-t", "1", bookinfo.container("ratings-netns"))
    deadline = time.monotonic() + 90  # the pilot gives the proxy up to 60 s to be ready
    while started_at(app) == app_started:
        assert time.monotonic() < deadline, "the pilot did not restart the stranded app"
        time.sleep(0.2)
    assert started_at(proxy) < started_at(app), "the app came back before its proxy"
    answers = bookinfo.get_json("ratings", "http://reviews:9080/reviews/0")
    assert answers[0]["status"] == 200, answers
    wait_until_serving(bookinfo, "reviews-v2", "http://ratings:9080/ratings/0")
