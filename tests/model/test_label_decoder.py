"""The one composemesh.* label decoder: a typed value plus every problem, each naming its label.

``decode_labels`` never raises; the CLI's ``parse_labels`` raises the first problem (its
messages are pinned in test_labels.py), the pilot keeps what decoded (tests/pilot).
"""

from __future__ import annotations

import pytest

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.labels import (
    LabelError,
    MeshLabels,
    decode_labels,
    parse_labels,
)
from composemesh.model.limits import ProxyLimits

DEFAULT = MeshLabels(
    enabled=True, service="web", version=wk.DEFAULT_VERSION, weight=None, protocol=None
)


def decode(
    labels: dict[str, str], service: str = "web"
) -> tuple[MeshLabels, tuple[LabelError, ...]]:
    return decode_labels(labels, compose_service=service)


def only_problem(labels: dict[str, str], service: str = "web") -> LabelError:
    _, problems = decode(labels, service)
    assert len(problems) == 1, problems
    return problems[0]


def test_no_labels_no_problems() -> None:
    assert decode({}) == (DEFAULT, ())


def test_foreign_and_injector_labels_are_no_problem() -> None:
    labels = {"traefik.enable": "x", wk.LABEL_ROLE: "netns", wk.LABEL_OF: "web",
              wk.LABEL_INSTANCE: "2"}
    assert decode(labels) == (DEFAULT, ())


def test_the_value_is_frozen() -> None:
    decoded, _ = decode({"composemesh.port.80.protocol": "http"})
    with pytest.raises(TypeError):
        decoded.port_protocols[81] = "tcp"  # type: ignore[index]


# --------------------------------------------------------------------------- one per label


def test_enable() -> None:
    assert decode({wk.LABEL_ENABLE: "off"}) == (
        MeshLabels(enabled=False, service="web", version="v1", weight=None, protocol=None), ()
    )
    decoded, problems = decode({wk.LABEL_ENABLE: "maybe"})
    assert decoded.enabled is True
    assert problems == (LabelError(wk.LABEL_ENABLE, "maybe", "'maybe' is not true or false"),)


def test_service() -> None:
    assert decode({wk.LABEL_SERVICE: "reviews"})[0].service == "reviews"
    decoded, problems = decode({wk.LABEL_SERVICE: "Reviews"})
    assert decoded.service == "web"  # the compose service's name
    (problem,) = problems
    assert (problem.label, problem.value) == (wk.LABEL_SERVICE, "Reviews")
    assert problem.reason.startswith("'Reviews' is not a valid mesh service name")


def test_service_default_that_is_no_mesh_name_is_kept_and_named() -> None:
    decoded, problems = decode({}, service="Web_App")
    assert decoded.service == "Web_App"
    assert [(p.label, p.value) for p in problems] == [(wk.LABEL_SERVICE, "Web_App")]


def test_version() -> None:
    assert decode({wk.LABEL_VERSION: "v2.1-canary"})[0].version == "v2.1-canary"
    decoded, problems = decode({wk.LABEL_VERSION: "V1"})
    assert decoded.version == wk.DEFAULT_VERSION
    (problem,) = problems
    assert (problem.label, problem.value) == (wk.LABEL_VERSION, "V1")
    assert problem.reason.startswith("'V1' is not a valid version name")


def test_weight() -> None:
    assert decode({wk.LABEL_WEIGHT: " 30 "})[0].weight == 30
    decoded, problems = decode({wk.LABEL_WEIGHT: "10%"})
    assert decoded.weight is None
    assert problems == (
        LabelError(wk.LABEL_WEIGHT, "10%", "'10%' is not a non-negative integer"),
    )


def test_weight_in_superscript_digits_is_a_problem_not_a_crash() -> None:
    assert only_problem({wk.LABEL_WEIGHT: "²"}).label == wk.LABEL_WEIGHT


def test_protocol() -> None:
    assert decode({wk.LABEL_PROTOCOL: " HTTP "})[0].protocol == "http"
    decoded, problems = decode({wk.LABEL_PROTOCOL: "udp"})
    assert decoded.protocol is None
    assert problems == (LabelError(
        wk.LABEL_PROTOCOL, "udp", "'udp' is not a known protocol (one of http, tcp)"
    ),)


def test_port_protocol() -> None:
    decoded, problems = decode({"composemesh.port.5432.protocol": "TCP"})
    assert (decoded.port_protocols, problems) == ({5432: "tcp"}, ())
    decoded, problems = decode({
        "composemesh.port.53.protocol": "dns",
        "composemesh.port.0.protocol": "http",
        "composemesh.port.².protocol": "http",
        "composemesh.port.9080.protocol": "http",
    })
    assert decoded.port_protocols == {9080: "http"}  # the good one still counts
    assert [(p.label, p.value, p.reason) for p in problems] == [
        ("composemesh.port.53.protocol", "dns",
         "'dns' is not a known protocol (one of http, tcp)"),
        ("composemesh.port.0.protocol", "http", "'0' is not a port number (1-65535)"),
        ("composemesh.port.².protocol", "http", "'²' is not a port number (1-65535)"),
    ]


def test_proxy_limits() -> None:
    decoded, problems = decode({
        "composemesh.proxy.idle_timeout": "5m",
        "composemesh.proxy.max_url_kb": "lots",
        "composemesh.proxy.no_such_limit": "1",
    })
    assert decoded.limits == ProxyLimits(idle_timeout=300.0)  # the good one still counts
    assert [(p.label, p.value) for p in problems] == [
        ("composemesh.proxy.max_url_kb", "lots"),
        ("composemesh.proxy.no_such_limit", "1"),
    ]
    assert problems[0].reason.startswith("'lots' is not a size in KiB")
    assert problems[1].reason.startswith("unknown proxy limit; the limits are ")


def test_unknown_label() -> None:
    problem = only_problem({"composemesh.wieght": "5"})
    assert (problem.label, problem.value) == ("composemesh.wieght", "5")
    assert problem.reason.startswith("unknown label; known labels are composemesh.enable, ")


# --------------------------------------------------------------------------- the CLI's path


def test_every_problem_is_reported_in_the_clis_order() -> None:
    labels = {
        wk.LABEL_WEIGHT: "x",
        "composemesh.proxy.idle_timeout": "x",
        "composemesh.port.1.protocol": "x",
        wk.LABEL_PROTOCOL: "x",
        wk.LABEL_VERSION: "X",
        wk.LABEL_SERVICE: "X",
        wk.LABEL_ENABLE: "x",
        "composemesh.bogus": "x",
    }
    _, problems = decode(labels)
    assert [p.label for p in problems] == [
        "composemesh.bogus", wk.LABEL_ENABLE, wk.LABEL_SERVICE, wk.LABEL_VERSION,
        wk.LABEL_WEIGHT, wk.LABEL_PROTOCOL, "composemesh.port.1.protocol",
        "composemesh.proxy.idle_timeout",
    ]
    # The CLI refuses on the first, with the service and the label named.
    with pytest.raises(ConfigError) as info:
        parse_labels(labels, compose_service="web")
    assert str(info.value) == f"service 'web': {problems[0]}"
    assert (info.value.service, info.value.field) == ("web", "label composemesh.bogus")


def test_the_cli_gets_the_decoded_value_when_there_is_no_problem() -> None:
    labels = {wk.LABEL_SERVICE: "reviews", wk.LABEL_WEIGHT: "20",
              "composemesh.port.9080.protocol": "http", "composemesh.proxy.max_url_kb": "8"}
    decoded, problems = decode(labels, "reviews-v2")
    assert problems == ()
    assert parse_labels(labels, compose_service="reviews-v2") == decoded
