"""The CLI's Docker access layer (``engine.docker_host``): the pure parts (``docker port``'s
address, ``docker ps``'s name), then each call through
the real Docker SDK against the fake engine of tests/engine/fake_engine.py."""

from __future__ import annotations

import socket

import pytest

from composemesh.engine import docker_host
from composemesh.engine.docker_host import (
    ContainerRef,
    DockerUnavailable,
    ExecResult,
    container_name,
    first_address,
)
from tests.engine.fake_engine import Engine

PROJECT = "com.docker.compose.project"

# --------------------------------------------------------------------------- pure


def test_the_first_address_is_as_docker_port_writes_it() -> None:
    bindings = [{"HostIp": "::", "HostPort": "32768"}, {"HostIp": "0.0.0.0", "HostPort": "32768"}]
    assert first_address(bindings) == "0.0.0.0:32768"
    assert first_address(bindings[:1]) == "[::]:32768"
    assert first_address([]) is None and first_address(None) is None


def test_the_name_is_the_one_docker_ps_shows() -> None:
    assert container_name({"Names": ["/shop-web-1"]}) == "shop-web-1"
    assert container_name({"Names": ["/other/alias", "/shop-db-1"]}) == "shop-db-1"
    assert container_name({"Names": []}) == ""


# --------------------------------------------------------------------------- against the engine


def test_a_projects_containers_are_listed_by_label_newest_first(engine: Engine) -> None:
    engine.add("a" * 64, "shop-web-1", {PROJECT: "shop", "com.docker.compose.service": "web"})
    engine.add("b" * 64, "shop-db-1", {PROJECT: "shop", "com.docker.compose.service": "db"},
               running=False)
    engine.add("c" * 64, "other-web-1", {PROJECT: "other"})
    assert docker_host.project_containers("shop") == [ContainerRef("a" * 12, "shop-web-1")]
    assert docker_host.project_containers("shop", running_only=False) == [
        ContainerRef("b" * 12, "shop-db-1"), ContainerRef("a" * 12, "shop-web-1")]
    assert docker_host.project_containers(
        "shop", labels={"com.docker.compose.service": "db"}, running_only=False) == [
        ContainerRef("b" * 12, "shop-db-1")]
    _, path, query = engine.calls[-1]
    assert path == "/containers/json" and query["all"] == ["1"]


def test_no_engine_lists_nothing_as_docker_ps_printed_nothing(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    docker_host._client.cache_clear()
    try:
        assert docker_host.project_containers("shop") == []
        assert docker_host.mounts("x") == [] and docker_host.health_log("x") == []
        assert docker_host.published_address("x", 80) is None
        with pytest.raises(DockerUnavailable):
            docker_host.exec_run("x", ["true"], {}, 5)
    finally:
        docker_host._client.cache_clear()


def test_logs_health_mounts_and_published_port_of_one_container(engine: Engine) -> None:
    cid = "d" * 64
    engine.add(cid, "shop-web-1", {PROJECT: "shop"},
               State={"Health": {"Log": [{"ExitCode": 1, "Output": "refused"},
                                         {"ExitCode": 1, "Output": "still refused"}]}},
               Mounts=[{"Destination": "/run/x", "Source": "/var/lib/x"}],
               NetworkSettings={"Ports": {"9080/tcp": [{"HostIp": "0.0.0.0",
                                                        "HostPort": "49153"}],
                                          "9090/tcp": None}})
    engine.logs["shop-web-1"] = [(1, b"line %d\n" % i) for i in range(20)] + [(2, b"boom\n")]
    text = docker_host.logs_tail("shop-web-1", 15)
    assert text.splitlines() == [f"line {i}" for i in range(6, 20)] + ["boom"]
    assert [c["Output"] for c in docker_host.health_log("shop-web-1")] == [
        "refused", "still refused"]
    assert docker_host.mounts(cid) == [{"Destination": "/run/x", "Source": "/var/lib/x"}]
    assert docker_host.published_address(cid, 9080) == "0.0.0.0:49153"
    assert docker_host.published_address(cid, 9090) is None
    assert docker_host.published_address(cid, 1) is None


def test_an_unknown_container_has_the_engines_sentence_for_logs_and_nothing_else(
        engine: Engine) -> None:
    said = docker_host.logs_tail("gone", 15)
    assert said == "Error response from daemon: No such container: gone"
    assert docker_host.health_log("gone") == [] and docker_host.mounts("gone") == []
    with pytest.raises(DockerUnavailable, match="^Error response from daemon: No such container"):
        docker_host.exec_run("gone", ["true"], {}, 5)


def test_exec_passes_its_environment_and_reads_both_streams_and_the_code(
        engine: Engine) -> None:
    engine.add("e" * 64, "shop-pilot-1", {PROJECT: "shop"})
    seen: list[tuple[str, list[str], dict[str, str]]] = []

    def run(container: str, cmd: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
        seen.append((container, cmd, env))
        return 3, b"out:" + env.get("BODY", "").encode(), b"err"

    engine.on_exec = run
    body = '{"step": "begin"}' * 5000  # more than one read of the socket comes back
    assert docker_host.exec_run("shop-pilot-1", ["cat"], {"BODY": body}, 10) == ExecResult(
        3, b"out:" + body.encode(), b"err")
    assert docker_host.exec_run("e" * 12, ["true"], {}, 10) == ExecResult(3, b"out:", b"err")
    assert seen == [("e" * 64, ["cat"], {"BODY": body}), ("e" * 64, ["true"], {})]


def test_an_exec_that_does_not_end_in_time_is_a_timeout(engine: Engine) -> None:
    engine.add("f" * 64, "shop-pilot-1", {PROJECT: "shop"})
    release = socket.socketpair()

    def hang(container: str, cmd: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
        release[0].settimeout(10)
        release[0].recv(1)  # until the test has seen the timeout
        return 0, b"", b""

    engine.on_exec = hang
    try:
        with pytest.raises(TimeoutError):
            docker_host.exec_run("shop-pilot-1", ["sleep"], {}, 0.5)
    finally:
        release[1].send(b"x")
        release[0].close()
        release[1].close()


def test_the_engine_client_for_images_is_pinged(engine: Engine) -> None:
    client = docker_host.pinged_client(timeout=30)
    assert ("GET", "/_ping", {}) in engine.calls or ("HEAD", "/_ping", {}) in engine.calls
    client.close()


def test_no_engine_for_images_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailable):
        docker_host.pinged_client(timeout=1)

