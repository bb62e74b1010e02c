"""ServiceRouting on the wire (``model.wire``), as it travels in snapshots: exact round trip,
strict decoding that names the field at fault."""

from __future__ import annotations

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
)
from composemesh.model.routing_config import build_routing
from composemesh.model.wire import ContractError, decode, encode


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
    return decode(encode(r), ServiceRouting)


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
    assert encode(rich_routing()) == encode(rich_routing())
    assert json.loads(encode(rich_routing()))["routes"][0]["retries"]["retry_on"] == [
        "5xx",
        "reset",
        "retriable-4xx",
    ]


def broken(path: list[Any], value: Any) -> bytes:
    obj = json.loads(encode(rich_routing()))
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["service"], 3, "$.service: Expected `str`, got `int`"),
        (["load_balancer"], "random", "$.load_balancer: Invalid enum value 'random'"),
        (["routes"], KeyError, "$: Object missing required field `routes`"),
        (["routes"], {}, "$.routes: Expected `array`, got `object`"),
        (["connect_timeout_s"], "2s", "$.connect_timeout_s: Expected `float`, got `str`"),
        (["outlier", "consecutive_errors"], True, "$.outlier.consecutive_errors: Expected `int`"),
        (["routes", 0, "name"], None, "$.routes[0].name: Expected `str`, got `null`"),
        (["routes", 0, "matches", 0, "path", "kind"], "suffix",
         "$.routes[0].matches[0].path.kind: Invalid enum value 'suffix'"),
        (["routes", 0, "matches", 1, "path", "value"], "(",
         "$.routes[0].matches[1].path: '(' is not a valid regex"),
        (["routes", 0, "matches", 0, "headers", 0], ["a"],
         "$.routes[0].matches[0].headers[0]: Expected `array` of length 2"),
        (["routes", 0, "matches", 0, "method"], 1,
         "$.routes[0].matches[0].method: Expected `str | null`, got `int`"),
        (["routes", 0, "destinations", 0, "weight"], 1.5,
         "$.routes[0].destinations[0].weight: Expected `int`, got `float`"),
        (["routes", 0, "retries", "retry_on"], ["sometimes"],
         "$.routes[0].retries: retry_on: 'sometimes' is not one of 5xx"),
        (["routes", 0, "retries", "retry_non_idempotent"], 1,
         "$.routes[0].retries.retry_non_idempotent: Expected `bool`, got `int`"),
        (["routes", 0, "fault", "abort", "status"], "503",
         "$.routes[0].fault.abort.status: Expected `int`, got `str`"),
        (["routes", 0, "fault", "delay"], [], "$.routes[0].fault.delay: Expected `object | null`"),
        (["routes", 0, "destinations", 0, "version"], KeyError,
         "$.routes[0].destinations[0]: Object missing required field `version`"),
    ],
)
def test_decoding_refuses_with_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ContractError) as info:
        decode(broken(path, value), ServiceRouting)
    assert str(info.value).startswith(message), str(info.value)


def test_decoding_refuses_a_non_object() -> None:
    with pytest.raises(ContractError, match=r"^\$: Expected `object`, got `array`$"):
        decode(b"[]", ServiceRouting)
