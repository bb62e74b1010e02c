"""Bad input through the real CLI: one clear sentence, exit 2, nothing written, nothing started."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from composemesh.engine.compose import state_dir
from tests.e2e.conftest import composemesh, force_remove, project_resources, unique_project

GOOD_SERVICE = """
services:
  web:
    image: composemesh-demo:0.1.0
    command: ["ratings"]
    labels:
      {label}
"""

CASES = {
    "not-yaml": ("services:\n  web: [image: x\n", ["compose.yaml", "line"]),
    "compose-rejects": (
        "services:\n  web:\n    image: x\n    ports: 12\n",
        ["compose.yaml", "ports"],
    ),
    "weight-abc": (
        GOOD_SERVICE.format(label='composemesh.weight: "abc"'),
        ["compose.yaml", "service 'web'", "composemesh.weight", "'abc'"],
    ),
    "weight-negative": (
        GOOD_SERVICE.format(label='composemesh.weight: "-5"'),
        ["compose.yaml", "service 'web'", "composemesh.weight", "'-5'"],
    ),
    "unknown-protocol": (
        GOOD_SERVICE.format(label="composemesh.protocol: udp"),
        ["compose.yaml", "service 'web'", "composemesh.protocol", "'udp'"],
    ),
    "unknown-label": (
        GOOD_SERVICE.format(label="composemesh.wieght: '3'"),
        ["compose.yaml", "service 'web'", "composemesh.wieght"],
    ),
    "ttl-zero": ("x-composemesh:\n  mtls: {mode: STRICT, workload_cert_ttl: 0}\n"
                 + GOOD_SERVICE.format(label="composemesh.version: v1"),
                 ["compose.yaml", "x-composemesh.mtls.workload_cert_ttl"]),
    "ttl-abc": ("x-composemesh:\n  mtls: {workload_cert_ttl: abc}\n"
                + GOOD_SERVICE.format(label="composemesh.version: v1"),
                ["compose.yaml", "x-composemesh.mtls.workload_cert_ttl", "abc"]),
    "policy-unknown-identity": (
        "x-composemesh:\n  policies:\n    web:\n      - from: [nobody]\n"
        + GOOD_SERVICE.format(label="composemesh.version: v1"),
        ["compose.yaml", "x-composemesh.policies.web", "nobody"]),
    "route-unknown-version": (
        "x-composemesh:\n  routes:\n    web:\n      http:\n        - route: {v7: 100}\n"
        + GOOD_SERVICE.format(label="composemesh.version: v1"),
        ["compose.yaml", "x-composemesh.routes.web", "v7"]),
    "route-bad-regex": (
        "x-composemesh:\n  routes:\n    web:\n      http:\n"
        "        - match: [{path: {regex: '(unclosed'}}]\n          route: {v1: 100}\n"
        "        - route: {v1: 100}\n"
        + GOOD_SERVICE.format(label="composemesh.version: v1"),
        ["compose.yaml", "x-composemesh.routes.web", "regex"]),
    "retries-not-a-number": (
        "x-composemesh:\n  routes:\n    web:\n      http:\n"
        "        - retries: {attempts: many}\n"
        + GOOD_SERVICE.format(label="composemesh.version: v1"),
        ["compose.yaml", "x-composemesh.routes.web", "attempts"]),
    "unknown-mesh-key": (
        "x-composemesh:\n  trustdomain: x\n" + GOOD_SERVICE.format(label="composemesh.version: v1"),
        ["compose.yaml", "x-composemesh", "trustdomain"],
    ),
}


def write_case(tmp_path: Path, name: str) -> Path:
    text, _ = CASES[name]
    path = tmp_path / "compose.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_and_inject_refuse_with_one_sentence(tmp_path: Path, name: str) -> None:
    path = write_case(tmp_path, name)
    expected = CASES[name][1]
    out = tmp_path / "meshed.yaml"
    for args in (["check", "-f", str(path)], ["inject", "-f", str(path), "-o", str(out)]):
        proc = composemesh(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        message = proc.stderr.strip()
        assert message.startswith("error:"), message
        assert len(message.splitlines()) == 1, f"more than one line: {message!r}"
        for part in expected:
            assert part in message, f"{part!r} not in {message!r}"
        assert "Traceback" not in proc.stderr
    assert not out.exists(), "inject wrote a file despite the error"
    assert proc.stdout == ""


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["weight-abc", "compose-rejects"])
def test_up_refuses_and_starts_nothing(tmp_path: Path, name: str, engine: None) -> None:
    path = write_case(tmp_path, name)
    project = unique_project("bad")
    try:
        proc = composemesh("up", "-f", str(path), "-p", project, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr
        assert project_resources(project) == {"containers": [], "networks": [], "volumes": []}
    finally:
        force_remove(project)  # should `up` start anything after all, it does not outlive us
    state = state_dir(project)
    assert not state.exists(), "up wrote its meshed file despite the error"
