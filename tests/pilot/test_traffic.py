"""Request and error rates from the proxies' Prometheus text: pure parsing and rating."""

import pytest

from composemesh.pilot.traffic import parse_requests, rates, sent_rates


def line(reporter: str, version: str, code: str, value: float) -> str:
    return (f'istio_requests_total{{reporter="{reporter}",destination_service_name="reviews",'
            f'destination_version="{version}",response_code="{code}"}} {value}')


TEXT = "\n".join([
    "# HELP istio_requests_total Requests",
    "# TYPE istio_requests_total counter",
    line("source", "v1", "200", 90.0),
    line("source", "v1", "503", 10.0),
    line("source", "v2", "200", 5.0),
    line("destination", "v1", "200", 999.0),
    "# TYPE istio_tcp_sent_bytes_total counter",
    'istio_tcp_sent_bytes_total{reporter="source"} 12345.0',
    "",
])


def test_only_source_reported_requests_are_counted():
    parsed = parse_requests(TEXT)
    assert parsed == {("reviews", "v1", "200"): 90.0, ("reviews", "v1", "503"): 10.0,
                      ("reviews", "v2", "200"): 5.0}


def test_rates_over_the_interval_with_errors_and_a_restarted_proxy():
    before = {"a": {("reviews", "v1", "200"): 100.0, ("reviews", "v1", "503"): 0.0},
              "b": {("reviews", "v1", "200"): 50.0}}
    after = {"a": {("reviews", "v1", "200"): 150.0, ("reviews", "v1", "503"): 10.0},
             "b": {("reviews", "v1", "200"): 20.0}}  # b restarted: 20 new requests
    r = rates(before, after, 10.0)[("reviews", "v1")]
    assert r.requests_per_s == pytest.approx((50 + 10 + 20) / 10)
    assert r.errors_per_s == pytest.approx(1.0)
    assert r.error_ratio == pytest.approx(10 / 80)


def test_no_traffic_no_rate():
    same = {"a": {("reviews", "v1", "200"): 5.0}}
    assert rates(same, same, 5.0) == {}


def test_what_each_proxy_sent_whatever_the_destination():
    """A gateway's request rate: everything its proxy sent, errors among it."""
    before = {"gw": {("web", "v1", "200"): 10.0, ("api", "v1", "503"): 1.0}}
    after = {"gw": {("web", "v1", "200"): 30.0, ("api", "v1", "503"): 5.0},
             "new": {("web", "v1", "200"): 4.0}}
    sent = sent_rates(before, after, 2.0)
    assert (sent["gw"].requests_per_s, sent["gw"].errors_per_s) == (12.0, 2.0)
    assert sent["new"].requests_per_s == 2.0  # a proxy not seen before: all of it is new
