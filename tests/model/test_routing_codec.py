"""ServiceRouting <-> JSON, as it travels in snapshots: exact round trip, strict decoding."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from composemesh.model.routing import (
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    RetryPolicy,
    ServiceRouting,
    StringMatch,
    WeightedSubset,
    routing_from_json,
    routing_to_json,
)
from composemesh.model.routing_config import build_routing


def rich_routing() -> ServiceRouting:
    return ServiceRouting(
        service="reviews",
        routes=(
            HttpRoute(
                name="jason",
                matches=(
                    HttpMatch(
                        path=StringMatch("prefix", "/reviews"),
                        headers=(
                            ("end-user", StringMatch("exact", "jason")),
                            ("x-trace", StringMatch("regex", "[0-9a-f]{32}")),
                        ),
                        method="GET",
                    ),
                    HttpMatch(path=StringMatch("regex", "/api/v[12]/.*")),
                ),
                destinations=(WeightedSubset("v2", 90), WeightedSubset("v3", 10)),
                retries=RetryPolicy(
                    attempts=3,
                    per_try_timeout_s=0.25,
                    retry_on=frozenset({"5xx", "retriable-4xx", "reset"}),
                    retry_non_idempotent=True,
                ),
                timeout_s=1.5,
                fault=FaultPolicy(delay=FaultDelay(2.0, 10.0), abort=FaultAbort(503, 0.5)),
            ),
            HttpRoute(
                name="abort-only",
                matches=(HttpMatch(method="POST"),),
                destinations=(WeightedSubset("v1", 1),),
                fault=FaultPolicy(abort=FaultAbort(500, 100.0)),
            ),
            HttpRoute(
                name="default",
                matches=(),
                destinations=(WeightedSubset("v1", 80), WeightedSubset("v2", 20)),
                retries=RetryPolicy(attempts=0, retry_on=frozenset()),
            ),
        ),
        load_balancer="least_request",
        outlier=OutlierPolicy(consecutive_errors=3, base_ejection_s=12.5, max_ejection_percent=100),
        connect_timeout_s=0.75,
    )


def through_the_wire(r: ServiceRouting) -> ServiceRouting:
    return routing_from_json(json.loads(json.dumps(routing_to_json(r), sort_keys=True)))


def test_round_trip_is_exact() -> None:
    r = rich_routing()
    back = through_the_wire(r)
    assert back == r
    assert isinstance(back.routes, tuple)
    assert isinstance(back.routes[0].matches[0].headers, tuple)
    assert isinstance(back.routes[0].matches[0].headers[0], tuple)
    assert isinstance(back.routes[0].retries.retry_on, frozenset)
    assert isinstance(back.routes[0].destinations, tuple)
    assert hash(back) == hash(r)  # frozen all the way down


def test_round_trip_without_outlier_and_with_defaults() -> None:
    r = ServiceRouting(
        service="ratings",
        routes=(HttpRoute("default", (), (WeightedSubset("v1", 100),)),),
        outlier=None,
    )
    assert through_the_wire(r) == r


def test_round_trip_of_built_routing() -> None:
    section = {
        "reviews": {
            "outlier_detection": False,
            "http": [
                {
                    "match": [{"headers": {"cookie": {"regex": ".*user=jason.*"}}}],
                    "route": {"v2": 1},
                    "fault": {"delay": {"fixed": "100ms", "percent": 33.3}},
                }
            ],
        }
    }
    for r in build_routing({"reviews": {"v1": None, "v2": 5}}, section).values():
        assert through_the_wire(r) == r


def test_encoding_is_stable_json() -> None:
    """Same routing, same bytes: the snapshot's content version depends on it."""
    a = json.dumps(routing_to_json(rich_routing()), sort_keys=True)
    b = json.dumps(routing_to_json(rich_routing()), sort_keys=True)
    assert a == b
    assert routing_to_json(rich_routing())["routes"][0]["retries"]["retry_on"] == [
        "5xx",
        "reset",
        "retriable-4xx",
    ]


def broken(path: list[Any], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(routing_to_json(rich_routing()))
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["service"], 3, "routing.service: must be a string, not int"),
        (["load_balancer"], "random", "routing.load_balancer: 'random' is not one of"),
        (["routes"], KeyError, "routing.routes: missing"),
        (["routes"], {}, "routing.routes: must be a list, not dict"),
        (["connect_timeout_s"], "2s", "routing.connect_timeout_s: must be a number, not str"),
        (["outlier", "consecutive_errors"], True, "routing.outlier.consecutive_errors: must be an"),
        (["routes", 0, "name"], None, "routing.routes[0].name: must be a string, not NoneType"),
        (["routes", 0, "matches", 0, "path", "kind"], "suffix", "routes[0].matches[0].path.kind"),
        (["routes", 0, "matches", 1, "path", "value"], "(", "matches[1].path.value: '(' is not a"),
        (["routes", 0, "matches", 0, "headers", 0], ["a"], "headers[0]: must be a [name, match]"),
        (["routes", 0, "matches", 0, "method"], 1, "routing.routes[0].matches[0].method: must be"),
        (["routes", 0, "destinations", 0, "weight"], 1.5, "destinations[0].weight: must be an int"),
        (["routes", 0, "retries", "retry_on"], ["sometimes"], "'sometimes' is not one of 5xx"),
        (["routes", 0, "retries", "retry_non_idempotent"], 1, "retry_non_idempotent: must be tr"),
        (["routes", 0, "fault", "abort", "status"], "503", "fault.abort.status: must be an int"),
        (["routes", 0, "fault", "delay"], [], "routing.routes[0].fault.delay: must be an object"),
        (["routes", 0, "timeout_s"], KeyError, "routing.routes[0].timeout_s: missing"),
    ],
)
def test_decoding_refuses_with_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        routing_from_json(broken(path, value))
    assert message in str(info.value)


def test_decoding_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match=r"^routing: must be an object, not list$"):
        routing_from_json([])
