"""x-composemesh: routes: and label weights -> ServiceRouting; every mistake named by its field."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.model.routing import (
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    OutlierPolicy,
    RetryPolicy,
    StringMatch,
    WeightedSubset,
)
from composemesh.model.routing_config import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    apply_weights,
    build_routing,
    label_split,
    parse_duration,
    parse_weights_args,
)

SERVICES: dict[str, dict[str, int | None]] = {
    "reviews": {"v1": None, "v2": None, "v3": None},
    "ratings": {"v1": None},
}
R = "x-composemesh.routes"
NO_MATCHES = (
    "must be a non-empty list of conditions (leave match out for a route that takes every request)"
)


def error(section: object, services: dict[str, dict[str, int | None]] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_routing(SERVICES if services is None else services, section)
    assert "\n" not in str(info.value)
    return info.value


def one_route(route: dict[str, Any]) -> dict[str, Any]:
    return {"reviews": {"http": [route]}}


def split(routing: Any, index: int = -1) -> dict[str, int]:
    return {d.version: d.weight for d in routing.routes[index].destinations}


# --------------------------------------------------------------------------- building


def test_no_routes_gives_every_service_a_default_route_from_labels() -> None:
    built = build_routing(SERVICES, None)
    assert set(built) == {"reviews", "ratings"}
    reviews = built["reviews"]
    assert len(reviews.routes) == 1
    default = reviews.routes[0]
    assert default.name == "default"
    assert default.matches == ()
    assert split(reviews) == {"v1": 34, "v2": 33, "v3": 33}
    assert default.retries == DEFAULT_RETRIES
    assert default.timeout_s == DEFAULT_TIMEOUT_S
    assert reviews.load_balancer == "round_robin"
    assert reviews.outlier == OutlierPolicy()
    assert split(built["ratings"]) == {"v1": 100}


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"v2": None, "v1": None}, {"v1": 50, "v2": 50}),
        ({"v1": None, "v2": None, "v3": None}, {"v1": 34, "v2": 33, "v3": 33}),
        ({"v1": 80, "v2": None, "v3": None}, {"v1": 80, "v2": 10, "v3": 10}),
        ({"v1": 70, "v2": None, "v3": None}, {"v1": 70, "v2": 15, "v3": 15}),
        ({"v1": 71, "v2": None, "v3": None}, {"v1": 71, "v2": 15, "v3": 14}),
        ({"v1": 100, "v2": None}, {"v1": 100, "v2": 0}),
        ({"v1": 150, "v2": None}, {"v1": 150, "v2": 0}),
        ({"v1": 3, "v2": 1}, {"v1": 3, "v2": 1}),
        ({"v1": 0, "v2": 5}, {"v1": 0, "v2": 5}),
    ],
)
def test_label_split(labels: dict[str, int | None], expected: dict[str, int]) -> None:
    assert label_split(labels) == expected
    assert list(label_split(labels)) == sorted(labels)  # deterministic order: by version name


def test_the_full_example_parses() -> None:
    section = {
        "reviews": {
            "load_balancer": "least_request",
            "connect_timeout": "2s",
            "outlier_detection": {
                "consecutive_errors": 3,
                "base_ejection_time": "10s",
                "max_ejection_percent": 20,
            },
            "http": [
                {
                    "name": "jason-to-v2",
                    "match": [
                        {
                            "headers": {"End-User": {"exact": "jason"}},
                            "path": {"prefix": "/reviews"},
                            "method": "get",
                        },
                        {"headers": {"x-canary": {"regex": "yes|true"}}},
                    ],
                    "route": {"v2": 100},
                    "retries": {
                        "attempts": 3,
                        "per_try_timeout": "250ms",
                        "retry_on": ["5xx", "connect-failure", "reset"],
                        "retry_non_idempotent": True,
                    },
                    "timeout": "1.5s",
                    "fault": {
                        "delay": {"fixed": "2s", "percent": 10},
                        "abort": {"status": 503, "percent": 5},
                    },
                },
                {"route": {"v1": 80, "v2": 20}},
            ],
        }
    }
    r = build_routing(SERVICES, section)["reviews"]
    assert r.load_balancer == "least_request"
    assert r.connect_timeout_s == 2.0
    assert r.outlier == OutlierPolicy(3, 10.0, 20)
    first, default = r.routes
    assert first.name == "jason-to-v2"
    assert first.matches == (
        HttpMatch(
            path=StringMatch("prefix", "/reviews"),
            headers=(("end-user", StringMatch("exact", "jason")),),
            method="GET",
        ),
        HttpMatch(headers=(("x-canary", StringMatch("regex", "yes|true")),)),
    )
    assert first.destinations == (WeightedSubset("v2", 100),)
    assert first.retries == RetryPolicy(
        3, 0.25, frozenset({"5xx", "connect-failure", "reset"}), True
    )
    assert first.timeout_s == 1.5
    assert first.fault == FaultPolicy(FaultDelay(2.0, 10.0), FaultAbort(503, 5.0))
    assert default.name == "default"
    assert default.matches == ()
    assert split(r) == {"v1": 80, "v2": 20}


def test_a_default_route_is_added_after_matched_routes() -> None:
    section = one_route({"match": [{"path": "/x"}], "route": {"v3": 1}})
    r = build_routing(SERVICES, section)["reviews"]
    assert [route.name for route in r.routes] == ["route-0", "default"]
    assert r.routes[0].matches == (HttpMatch(path=StringMatch("exact", "/x")),)
    assert split(r) == {"v1": 34, "v2": 33, "v3": 33}


def test_route_left_out_sends_to_the_label_split() -> None:
    services: dict[str, dict[str, int | None]] = {"reviews": {"v1": 90, "v2": 10}}
    section = {"reviews": {"http": [{"match": [{"method": "POST"}]}, {"name": "rest"}]}}
    r = build_routing(services, section)["reviews"]
    assert [route.name for route in r.routes] == ["route-0", "rest"]
    assert split(r, 0) == split(r, 1) == {"v1": 90, "v2": 10}


def test_service_level_retries_and_timeout_apply_to_routes_without_their_own() -> None:
    section = {
        "reviews": {
            "retries": {"attempts": 5},
            "timeout": "3s",
            "http": [
                {"match": [{"path": "/a"}], "retries": {"retry_on": "5xx, reset"}},
                {"match": [{"path": "/b"}], "timeout": 0},
            ],
        }
    }
    a, b, default = build_routing(SERVICES, section)["reviews"].routes
    assert a.retries.attempts == 5
    assert a.retries.retry_on == frozenset({"5xx", "reset"})
    assert a.timeout_s == 3.0
    assert b.retries == default.retries == RetryPolicy(5, None, DEFAULT_RETRIES.retry_on)
    assert b.timeout_s is None  # 0: no timeout
    assert default.timeout_s == 3.0


def test_outlier_detection_false_turns_it_off() -> None:
    r = build_routing(SERVICES, {"reviews": {"outlier_detection": False}})["reviews"]
    assert r.outlier is None


def test_empty_service_section_is_fine() -> None:
    assert build_routing(SERVICES, {"reviews": None})["reviews"].routes[0].name == "default"


def test_fault_percent_defaults_to_100() -> None:
    section = one_route({"fault": {"abort": {"status": 500}}})
    fault = build_routing(SERVICES, section)["reviews"].routes[0].fault
    assert fault == FaultPolicy(abort=FaultAbort(500, 100.0))


# --------------------------------------------------------------------------- errors


def bad_route_cases() -> list[tuple[dict[str, Any], str, str]]:
    h0 = f"{R}.reviews.http[0]"
    return [
        (
            {"route": {"v9": 100}},
            f"{h0}.route.v9",
            "'v9' is not a version of mesh service 'reviews' (its versions are v1, v2, v3)",
        ),
        ({"route": {"v1": -1}}, f"{h0}.route.v1", "-1 is not a non-negative integer weight"),
        ({"route": {"v1": 1.5}}, f"{h0}.route.v1", "1.5 is not a non-negative integer weight"),
        ({"route": {"v1": "80"}}, f"{h0}.route.v1", "'80' is not a non-negative integer weight"),
        ({"route": {"v1": True}}, f"{h0}.route.v1", "True is not a non-negative integer weight"),
        (
            {"route": {"v1": 0, "v2": 0}},
            f"{h0}.route",
            "every weight is 0, so no request would be routed",
        ),
        ({"route": {}}, f"{h0}.route", "must name at least one version with its weight"),
        (
            {"route": ["v1"]},
            f"{h0}.route",
            "must be a mapping of version to weight, like {v1: 80, v2: 20}",
        ),
        (
            {"match": [{"path": {"regex": "/(a"}}]},
            f"{h0}.match[0].path.regex",
            "'/(a' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 1",
        ),
        (
            {"retries": {"attempts": -1}},
            f"{h0}.retries.attempts",
            "-1 is not a non-negative integer",
        ),
        (
            {"retries": {"attempts": "3"}},
            f"{h0}.retries.attempts",
            "'3' is not a non-negative integer",
        ),
        (
            {"retries": {"attempts": 2.5}},
            f"{h0}.retries.attempts",
            "2.5 is not a non-negative integer",
        ),
        (
            {"retries": {"retry_on": ["5xx", "always"]}},
            f"{h0}.retries.retry_on",
            "'always' is not a retry condition "
            "(the conditions are 5xx, gateway-error, connect-failure, reset, retriable-4xx)",
        ),
        (
            {"retries": {"retry_non_idempotent": "yes"}},
            f"{h0}.retries.retry_non_idempotent",
            "'yes' is not true or false",
        ),
        (
            {"retries": {"per_try_timeout": "soon"}},
            f"{h0}.retries.per_try_timeout",
            "'soon' is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
        ),
        (
            {"timeout": "5 sec"},
            f"{h0}.timeout",
            "'5 sec' is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
        ),
        (
            {"timeout": -1},
            f"{h0}.timeout",
            "-1 is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
        ),
        (
            {"fault": {"delay": {"fixed": "2s", "percent": 101}}},
            f"{h0}.fault.delay.percent",
            "101 is not a percentage between 0 and 100",
        ),
        (
            {"fault": {"delay": {"fixed": "2s", "percent": -0.5}}},
            f"{h0}.fault.delay.percent",
            "-0.5 is not a percentage between 0 and 100",
        ),
        (
            {"fault": {"abort": {"status": 503, "percent": "5%"}}},
            f"{h0}.fault.abort.percent",
            "'5%' is not a percentage between 0 and 100",
        ),
        (
            {"fault": {"abort": {"status": 199}}},
            f"{h0}.fault.abort.status",
            "199 is not an HTTP status between 200 and 599",
        ),
        (
            {"fault": {"abort": {"status": 600}}},
            f"{h0}.fault.abort.status",
            "600 is not an HTTP status between 200 and 599",
        ),
        (
            {"fault": {"abort": {"percent": 5}}},
            f"{h0}.fault.abort",
            "needs status: the HTTP status to answer, like 503",
        ),
        (
            {"fault": {"delay": {"percent": 5}}},
            f"{h0}.fault.delay",
            "needs fixed: the delay, like 2s",
        ),
        (
            {"fault": {"delay": {"fixed": "x"}}},
            f"{h0}.fault.delay.fixed",
            "'x' is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
        ),
        (
            {"match": [{"headers": {"end user": "jason"}}]},
            f"{h0}.match[0].headers.end user",
            "'end user' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)",
        ),
        (
            {"match": [{"headers": {"x:y": "jason"}}]},
            f"{h0}.match[0].headers.x:y",
            "'x:y' is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)",
        ),
        (
            {"match": [{"method": "GE T"}]},
            f"{h0}.match[0].method",
            "'GE T' is not an HTTP method (like GET)",
        ),
        (
            {"match": []},
            f"{h0}.match",
            NO_MATCHES,
        ),
        (
            {"match": {"path": "/x"}},
            f"{h0}.match",
            NO_MATCHES,
        ),
        ({"match": [{}]}, f"{h0}.match[0]", "must hold at least one of headers, path, method"),
        (
            {"match": [{"path": {"exact": "/a", "prefix": "/b"}}]},
            f"{h0}.match[0].path",
            "must have exactly one of exact, prefix, regex",
        ),
        ({"name": ""}, f"{h0}.name", "'' is not a route name (a non-empty string)"),
        # unknown keys, at every level, say which keys are allowed
        (
            {"destination": {"v1": 1}},
            h0,
            "unknown key 'destination'; the keys are name, match, route, retries, timeout, fault",
        ),
        (
            {"match": [{"uri": "/x"}]},
            f"{h0}.match[0]",
            "unknown key 'uri'; the keys are headers, path, method",
        ),
        (
            {"match": [{"path": {"suffix": "/x"}}]},
            f"{h0}.match[0].path",
            "unknown key 'suffix'; the keys are exact, prefix, regex",
        ),
        (
            {"retries": {"tries": 3}},
            f"{h0}.retries",
            "unknown key 'tries'; "
            "the keys are attempts, per_try_timeout, retry_on, retry_non_idempotent",
        ),
        ({"fault": {"drop": {}}}, f"{h0}.fault", "unknown key 'drop'; the keys are delay, abort"),
        (
            {"fault": {"delay": {"fixed": "1s", "pct": 1}}},
            f"{h0}.fault.delay",
            "unknown key 'pct'; the keys are fixed, percent",
        ),
        (
            {"fault": {"abort": {"status": 500, "code": 1}}},
            f"{h0}.fault.abort",
            "unknown key 'code'; the keys are status, percent",
        ),
    ]


@pytest.mark.parametrize(("route", "field", "message"), bad_route_cases())
def test_bad_route(route: dict[str, Any], field: str, message: str) -> None:
    err = error(one_route(route))
    assert err.field == field
    assert err.message == message
    assert str(err) == f"{field}: {message}"


@pytest.mark.parametrize(
    ("service_spec", "field", "message"),
    [
        (
            {"retry": {}},
            f"{R}.reviews",
            "unknown key 'retry'; the keys are load_balancer, connect_timeout, "
            "outlier_detection, retries, timeout, http",
        ),
        (
            {"load_balancer": "random"},
            f"{R}.reviews.load_balancer",
            "'random' is not a load balancer (the load balancers are round_robin, least_request)",
        ),
        ({"connect_timeout": "0s"}, f"{R}.reviews.connect_timeout", "must be more than 0"),
        (
            {"connect_timeout": "2 minutes"},
            f"{R}.reviews.connect_timeout",
            "'2 minutes' is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
        ),
        (
            {"outlier_detection": {"consecutive_errors": 0}},
            f"{R}.reviews.outlier_detection.consecutive_errors",
            "0 is not a positive integer",
        ),
        (
            {"outlier_detection": {"max_ejection_percent": 101}},
            f"{R}.reviews.outlier_detection.max_ejection_percent",
            "101 is not an integer percentage between 0 and 100",
        ),
        (
            {"outlier_detection": {"interval": "10s"}},
            f"{R}.reviews.outlier_detection",
            "unknown key 'interval'; the keys are consecutive_errors, base_ejection_time, "
            "max_ejection_percent",
        ),
        (
            {"outlier_detection": "yes"},
            f"{R}.reviews.outlier_detection",
            "must be a mapping or false",
        ),
        ({"http": {"route": {"v1": 1}}}, f"{R}.reviews.http", "must be a list of routes"),
        (
            {"retries": {"attempts": -2}},
            f"{R}.reviews.retries.attempts",
            "-2 is not a non-negative integer",
        ),
        (
            {"http": [{"name": "a"}, {"name": "b", "match": [{"path": "/b"}]}]},
            f"{R}.reviews.http[0]",
            "has no match, so it takes every request and the routes after it would never be "
            "used; move it last",
        ),
        (
            {"http": [{"name": "a", "match": [{"path": "/a"}]}, {"name": "a"}]},
            f"{R}.reviews.http[1].name",
            "the route name 'a' is used twice",
        ),
        (
            {"http": [{"name": "default", "match": [{"path": "/a"}]}]},
            f"{R}.reviews.http[0].name",
            "'default' names the route added for the requests no route matches; give this one "
            "another name (or no match)",
        ),
        (
            "fast",
            f"{R}.reviews",
            "must be a mapping with keys "
            "load_balancer, connect_timeout, outlier_detection, retries, timeout, http",
        ),
    ],
)
def test_bad_service_section(service_spec: Any, field: str, message: str) -> None:
    err = error({"reviews": service_spec})
    assert (err.field, err.message) == (field, message)


def test_unknown_mesh_service() -> None:
    err = error({"reviewz": {}})
    assert err.field == f"{R}.reviewz"
    assert err.message == "'reviewz' is not a mesh service (the mesh services are ratings, reviews)"


def test_routes_when_nothing_is_meshed() -> None:
    err = error({"reviews": {}}, services={})
    assert (
        err.message
        == "'reviews' is not a mesh service (the mesh services are none: no service is in the mesh)"
    )  # noqa: E501


def test_routes_section_must_be_a_mapping() -> None:
    err = error(["reviews"])
    assert (err.field, err.message) == (R, "must be a mapping of mesh service to its routing")


def test_label_weights_all_zero_are_an_error_when_the_default_uses_them() -> None:
    services: dict[str, dict[str, int | None]] = {"reviews": {"v1": 0, "v2": 0}}
    err = error(None, services)
    assert err.service == "reviews"
    assert err.field == "label composemesh.weight"
    assert err.message == (
        "every version of mesh service 'reviews' has weight 0, so no request would be routed"
    )
    # ... and fine when the user's own default route says where requests go
    built = build_routing(services, {"reviews": {"http": [{"route": {"v1": 1}}]}})
    assert split(built["reviews"]) == {"v1": 1}


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        (" 3s ", 3.0),
        ("7", 7.0),
        (2, 2.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "f") == seconds


@pytest.mark.parametrize(
    "value",
    ["", "s", "2x", "-1s", "1.5.2s", "2 s s", True, None, [], -3, float("nan"), float("inf")],
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "x-composemesh.routes.reviews.timeout")
    assert info.value.field == "x-composemesh.routes.reviews.timeout"
    assert info.value.message == (
        f"{value!r} is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)"
    )


# --------------------------------------------------------------------------- composemesh route


def routing_with_header_route() -> Any:
    section = {
        "reviews": {
            "http": [
                {"match": [{"headers": {"end-user": "jason"}}], "route": {"v2": 100}},
                {"route": {"v1": 100}, "timeout": "4s"},
            ]
        }
    }
    return build_routing(SERVICES, section)["reviews"]


def test_apply_weights_replaces_the_default_split_only() -> None:
    before = routing_with_header_route()
    after = apply_weights(before, {"v2": 30, "v1": 70}, ("v1", "v2", "v3"))
    assert after.routes[0] == before.routes[0]
    assert after.routes[-1].destinations == (
        WeightedSubset("v2", 30),
        WeightedSubset("v1", 70),
        WeightedSubset("v3", 0),
    )
    assert after.routes[-1].timeout_s == 4.0  # the rest of the default route stays
    assert after.routes[-1].name == before.routes[-1].name
    assert (after.service, after.load_balancer, after.outlier) == (
        before.service,
        before.load_balancer,
        before.outlier,
    )


def test_apply_weights_adds_a_default_route_if_there_is_none() -> None:
    before = routing_with_header_route()
    headless = replace(before, routes=before.routes[:1])
    after = apply_weights(headless, {"v3": 1}, ("v1", "v3"))
    assert after.routes[0] == before.routes[0]
    assert after.routes[-1].name == "default"
    assert after.routes[-1].matches == ()
    assert split(after) == {"v3": 1, "v1": 0}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v9": 100}, "'v9' is not a version of 'reviews' (its versions are v1, v2, v3)"),
        ({"v1": -5}, "-5 (for v1) is not a non-negative integer weight"),
        ({"v1": 1.5}, "1.5 (for v1) is not a non-negative integer weight"),
        ({"v1": 0, "v2": 0}, "every weight is 0, so no request would be routed"),
        ({}, "name at least one VERSION=WEIGHT"),
    ],
)
def test_apply_weights_refuses(weights: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_weights(routing_with_header_route(), weights, ("v1", "v2", "v3"))
    assert (info.value.field, info.value.service, info.value.message) == (
        "route",
        "reviews",
        message,
    )


def test_parse_weights_args() -> None:
    assert parse_weights_args(["v1=80", "v2=20"]) == {"v1": 80, "v2": 20}
    assert list(parse_weights_args(["v2=0", "v1=1"])) == ["v2", "v1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["v1=abc"], "'abc' (for v1) is not a non-negative integer weight"),
        (["v1=-3"], "'-3' (for v1) is not a non-negative integer weight"),
        (["v1=1.5"], "'1.5' (for v1) is not a non-negative integer weight"),
        (["v1="], "'' (for v1) is not a non-negative integer weight"),
        (["v1"], "'v1' is not VERSION=WEIGHT (like v1=80)"),
        (["=80"], "'=80' is not VERSION=WEIGHT (like v1=80)"),
        (["v1=80", "v1=20"], "version 'v1' is given twice"),
        ([], "name at least one VERSION=WEIGHT"),
    ],
)
def test_parse_weights_args_refuses(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_weights_args(args)
    assert (info.value.field, info.value.message) == ("route", message)
