"""The pilot reads a holder's composemesh.* labels with the CLI's decoder (model.labels).

Same labels, same typed value on both paths; where the CLI refuses, the pilot meshes the
container with what decoded and logs the rest once per container.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.labels import LabelError, MeshLabels, decode_labels, parse_labels
from composemesh.model.mesh import Workload
from composemesh.pilot.sources.docker.convert import workloads_from_containers

# Labels a holder carries as well as the user's: the project's and the injector's own.
INJECTED = {"com.docker.compose.project": "p", wk.LABEL_ROLE: wk.ROLE_NETNS, wk.LABEL_OF: "web"}


def holder(labels: dict[str, str], name: str = "p-web-netns-1") -> dict[str, Any]:
    return {
        "Id": name,
        "Names": [f"/{name}"],
        "State": "running",
        "Labels": {**INJECTED, **labels},
        "HostConfig": {"NetworkMode": "default"},
        "NetworkSettings": {"Networks": {"n": {"IPAddress": "172.20.0.2"}}},
    }


def pilot(labels: dict[str, str]) -> tuple[Workload, list[tuple[str, tuple[LabelError, ...]]]]:
    logged: list[tuple[str, tuple[LabelError, ...]]] = []
    (workload,), skipped = workloads_from_containers(
        [holder(labels)], project="p", on_label_problems=lambda c, p: logged.append((c, p))
    )
    assert skipped == ()
    return workload, logged


def what_the_mesh_reads(value: MeshLabels | Workload) -> tuple[Any, ...]:
    ports = (tuple(sorted(value.port_protocols.items()))
             if isinstance(value, MeshLabels) else value.port_protocols)
    return value.service, value.version, value.weight, value.protocol, ports


GOOD = [
    {},
    {wk.LABEL_SERVICE: "reviews", wk.LABEL_VERSION: "v2"},
    {wk.LABEL_WEIGHT: "0"},
    {wk.LABEL_WEIGHT: "75"},
    {wk.LABEL_PROTOCOL: "tcp"},
    {wk.LABEL_PROTOCOL: "http", "composemesh.port.5432.protocol": "tcp",
     "composemesh.port.80.protocol": "http"},
    {wk.LABEL_ENABLE: "true", "composemesh.proxy.idle_timeout": "10s"},
]

BAD = [  # what the CLI refuses, and what the pilot meshes instead
    ({wk.LABEL_WEIGHT: "half"}, ("web", "v1", None, None, ())),
    ({wk.LABEL_WEIGHT: "²"}, ("web", "v1", None, None, ())),
    ({wk.LABEL_PROTOCOL: "udp"}, ("web", "v1", None, None, ())),
    ({wk.LABEL_PROTOCOL: "TCP", "composemesh.port.0.protocol": "http",
      "composemesh.port.53.protocol": "dns", "composemesh.port.80.protocol": "HTTP"},
     ("web", "v1", None, "tcp", ((80, "http"),))),
    ({wk.LABEL_SERVICE: "Reviews", wk.LABEL_VERSION: "v2", wk.LABEL_WEIGHT: "10"},
     ("web", "v2", 10, None, ())),
    ({wk.LABEL_VERSION: "", "composemesh.wieght": "5"}, ("web", "v1", None, None, ())),
    ({"composemesh.proxy.max_url_kb": "lots"}, ("web", "v1", None, None, ())),
]


@pytest.mark.parametrize("labels", GOOD)
def test_the_pilot_and_the_cli_agree(labels: dict[str, str]) -> None:
    workload, logged = pilot(labels)
    cli = parse_labels({**INJECTED, **labels}, compose_service="web")
    assert what_the_mesh_reads(workload) == what_the_mesh_reads(cli)
    assert logged == []


@pytest.mark.parametrize(("labels", "meshed"), BAD)
def test_where_the_cli_refuses_the_pilot_meshes_what_decoded(
    labels: dict[str, str], meshed: tuple[Any, ...]
) -> None:
    with pytest.raises(ConfigError):
        parse_labels(labels, compose_service="web")
    decoded, problems = decode_labels({**INJECTED, **labels}, compose_service="web")
    workload, logged = pilot(labels)
    assert what_the_mesh_reads(workload) == what_the_mesh_reads(decoded) == meshed
    assert logged == [("p-web-netns-1", problems)]  # once for the container, every problem


def test_problems_are_logged_once_per_container(caplog: pytest.LogCaptureFixture) -> None:
    listing = [
        holder({wk.LABEL_WEIGHT: "half", wk.LABEL_PROTOCOL: "udp"}, "p-web-netns-1"),
        holder({}, "p-web-netns-2"),
    ]
    with caplog.at_level(logging.WARNING, logger="composemesh.pilot.docker"):
        workloads, _ = workloads_from_containers(listing, project="p")
    assert [w.node for w in workloads] == ["p-web-netns-1", "p-web-netns-2"]
    assert [r.getMessage() for r in caplog.records] == [
        "container p-web-netns-1: label composemesh.weight: 'half' is not a non-negative "
        "integer; label composemesh.protocol: 'udp' is not a known protocol (one of http, "
        "tcp) (their defaults are used)"
    ]
