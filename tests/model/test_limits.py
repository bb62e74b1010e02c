"""The proxy's limits: labels parsed into ProxyLimits (errors naming the label), the env codec."""

from __future__ import annotations

import json

import pytest

from composemesh.errors import ConfigError
from composemesh.model.labels import parse_labels
from composemesh.model.limits import (
    ENV_LIMITS,
    FIELDS,
    ProxyLimits,
    limits_from_env,
    limits_to_env,
    parse_limits,
)
from composemesh.model.policy import KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_FORWARD

L = "composemesh.proxy."


def error(labels: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_limits(labels, "web")
    return str(info.value)


def test_defaults_are_envoys() -> None:
    limits = ProxyLimits()
    assert limits.max_request_head == 64 * 1024
    assert limits.max_headers_count == 100
    assert limits.max_url == 16 * 1024
    assert limits.max_response_head == 64 * 1024
    assert limits.request_headers_timeout == 10.0
    assert limits.idle_timeout == 3600.0
    assert limits.stream_idle_timeout == 300.0
    assert limits.tcp_idle_timeout == 3600.0
    assert limits.max_connections_per_source == 256
    assert limits.path_with_escaped_slashes_action == REJECT_REQUEST


def test_no_labels_no_change() -> None:
    assert parse_limits({}, "web") == ProxyLimits()
    assert parse_limits({"composemesh.service": "x", "other": "1"}, "web") == ProxyLimits()


def test_every_field_from_its_label() -> None:
    labels = {
        L + "max_request_headers_kb": "32",
        L + "max_headers_count": " 50 ",
        L + "max_url_kb": "8",
        L + "max_response_headers_kb": "128",
        L + "request_headers_timeout": "500ms",
        L + "idle_timeout": "1h",
        L + "stream_idle_timeout": "5m",
        L + "tcp_idle_timeout": "0",
        L + "max_connections_per_source": "0",
        L + "path_with_escaped_slashes_action": "keep_unchanged",
    }
    assert sorted(label[len(L):] for label in labels) == sorted(FIELDS)
    assert parse_limits(labels, "web") == ProxyLimits(
        max_request_headers_kb=32, max_headers_count=50, max_url_kb=8,
        max_response_headers_kb=128, request_headers_timeout=0.5, idle_timeout=3600.0,
        stream_idle_timeout=300.0, tcp_idle_timeout=0.0, max_connections_per_source=0,
        path_with_escaped_slashes_action=KEEP_UNCHANGED)


@pytest.mark.parametrize(("label", "value", "message"), [
    ("max_request_headers_kb", "0", "0 is not a size in KiB from 1 to 8192"),
    ("max_request_headers_kb", "8193", "8193 is not a size in KiB from 1 to 8192"),
    ("max_url_kb", "16k", "'16k' is not a size in KiB from 1 to 8192"),
    ("max_headers_count", "0", "0 is not a count of at least 1"),
    ("max_connections_per_source", "-1", "'-1' is not a number of connections (0: no limit)"),
    ("request_headers_timeout", "soon",
     "'soon' is not a duration (like 500ms, 10s, 5m, 1h; 0 turns it off)"),
    ("idle_timeout", "-1s", "'-1s' is not a duration (like 500ms, 10s, 5m, 1h; 0 turns it off)"),
    ("path_with_escaped_slashes_action", "decode",
     "'decode' is not one of REJECT_REQUEST, KEEP_UNCHANGED, UNESCAPE_AND_FORWARD"),
])
def test_a_bad_value_names_the_service_and_the_label(label: str, value: str, message: str) -> None:
    assert error({L + label: value}) == f"service 'web': label {L}{label}: {message}"


def test_an_unknown_limit_lists_the_known_ones() -> None:
    message = error({L + "max_body_kb": "1"})
    assert message.startswith(f"service 'web': label {L}max_body_kb: unknown proxy limit; "
                              "the limits are max_request_headers_kb, ")
    assert message.endswith("path_with_escaped_slashes_action")


def test_the_service_labels_carry_the_limits_and_check_them() -> None:
    labels = parse_labels({L + "request_headers_timeout": "2s"}, compose_service="web")
    assert labels.limits == ProxyLimits(request_headers_timeout=2.0)
    assert parse_labels({}, compose_service="web").limits == ProxyLimits()
    with pytest.raises(ConfigError) as info:
        parse_labels({L + "idle_timeout": "x"}, compose_service="web")
    assert str(info.value).startswith(f"service 'web': label {L}idle_timeout: ")


def test_env_round_trip_with_only_what_differs() -> None:
    assert limits_to_env(ProxyLimits()) == {}
    assert limits_from_env({}) == ProxyLimits()
    assert limits_from_env({ENV_LIMITS: " "}) == ProxyLimits()
    limits = ProxyLimits(request_headers_timeout=0.5, max_connections_per_source=3,
                         path_with_escaped_slashes_action=UNESCAPE_AND_FORWARD)
    env = limits_to_env(limits)
    assert json.loads(env[ENV_LIMITS]) == {
        "max_connections_per_source": 3, "path_with_escaped_slashes_action": UNESCAPE_AND_FORWARD,
        "request_headers_timeout": 0.5}
    assert limits_from_env(env) == limits
    assert limits_from_env({ENV_LIMITS: '{"idle_timeout": 2}'}) == ProxyLimits(idle_timeout=2.0)


@pytest.mark.parametrize(("text", "message"), [
    ("{", f"{ENV_LIMITS}: is not JSON ("),
    ("[1]", f"{ENV_LIMITS}: must be a JSON object of limits"),
    ('{"max_body_kb": 1}', f"{ENV_LIMITS}: unknown limit 'max_body_kb'; the limits are "),
    ('{"max_url_kb": 0}', f"{ENV_LIMITS}: max_url_kb: 0 is not a size in KiB from 1 to 8192"),
    ('{"idle_timeout": "1h"}', f"{ENV_LIMITS}: idle_timeout: '1h' is not a duration in seconds"),
    ('{"max_headers_count": true}', f"{ENV_LIMITS}: max_headers_count: True is not a count"),
])
def test_a_bad_environment_is_one_sentence(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        limits_from_env({ENV_LIMITS: text})
    assert str(info.value).startswith(message)


def test_the_value_itself_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_headers_count: 0 is not a count"):
        ProxyLimits(max_headers_count=0)
    with pytest.raises(ValueError, match="stream_idle_timeout: inf is not a duration"):
        ProxyLimits(stream_idle_timeout=float("inf"))
