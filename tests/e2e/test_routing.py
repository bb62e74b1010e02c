"""HTTP routing on the real engine: weighted splits, live `route`, matches, retries, timeouts,
faults, discovery of new and stopped endpoints, and a pilot that dies and comes back."""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Mesh,
    bring_up,
    composemesh,
    docker,
    tear_down,
    unique_project,
)

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent / "routing"


@pytest.fixture(scope="module")
def mesh(images: None) -> Iterator[Mesh]:
    m = bring_up(unique_project("routing"), [HERE / "compose.yaml"], {})
    try:
        yield m
    finally:
        tear_down(m)


def versions(answers: list[dict]) -> collections.Counter[str]:
    return collections.Counter(a.get("version", f"status {a['status']}") for a in answers)


def route(mesh: Mesh, *weights: str) -> subprocess.CompletedProcess[str]:
    return composemesh("route", "reviews", *weights, "-p", mesh.project)


def started_at(mesh: Mesh) -> dict[str, str]:
    names = docker(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={mesh.project}",
        "--format",
        "{{.Names}}",
    ).split()
    return {n: docker("inspect", "-f", "{{.State.StartedAt}}", n) for n in names}


@contextlib.contextmanager
def under_load(mesh: Mesh, count: str) -> Iterator[list[dict]]:
    """The client GETs reviews in a thread (``count`` at a time) until the block ends; yields
    the answers so far. An error in that thread fails the test instead of ending the load."""
    results: list[dict] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        try:
            while not stop.is_set():
                results.extend(mesh.get_json("client", "http://reviews:9080/reviews/0",
                                             "--count", count))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        yield results
    finally:
        stop.set()
        worker.join()
    assert not errors, f"the load stopped: {errors[0]!r}"


def test_weighted_split_80_20_over_2000_requests(mesh: Mesh) -> None:
    answers = mesh.get_json(
        "client", "http://reviews:9080/reviews/0", "--count", "2000", timeout=600
    )
    assert all(a["status"] == 200 for a in answers)
    counts = versions(answers)
    share_v2 = 100 * counts["v2"] / len(answers)
    assert abs(share_v2 - 20) <= 3, counts


def test_each_replica_has_its_own_sidecar_and_takes_traffic(mesh: Mesh) -> None:
    holders = {mesh.container(f"{s}-netns") for s in ("ratings", "ratings-2")}
    proxies = {mesh.container(f"{s}-proxy") for s in ("ratings", "ratings-2")}
    assert len(holders) == 2 and len(proxies) == 2
    answers = mesh.get_json("client", "http://ratings:9080/ratings/0", "--count", "40")
    assert all(a["status"] == 200 for a in answers)
    assert len({a["host"] for a in answers}) == 2, "one replica got no traffic"


def test_header_match_sends_the_marked_user_to_v2_only(mesh: Mesh) -> None:
    marked = mesh.get_json(
        "client", "http://reviews:9080/reviews/0", "--count", "100", "-H", "end-user: jason"
    )
    assert versions(marked) == {"v2": 100}
    others = mesh.get_json(
        "client", "http://reviews:9080/reviews/0", "--count", "100", "-H", "end-user: someone"
    )
    assert versions(others)["v1"] > 50


def test_calling_a_version_by_its_compose_name_reaches_that_version(mesh: Mesh) -> None:
    for version in ("v1", "v2"):
        answers = mesh.get_json("client", f"http://reviews-{version}:9080/reviews/0",
                                "--count", "30")
        assert versions(answers) == {version: 30}


def test_retry_turns_every_other_503_into_success(mesh: Mesh) -> None:
    answers = mesh.get_json("client", "http://flaky:9080/ratings/0", "--count", "50")
    assert [a["status"] for a in answers] == [200] * 50


def test_timeout_answers_504_in_time(mesh: Mesh) -> None:
    started = time.monotonic()
    answers = mesh.get_json("client", "http://slow:9080/ratings/0")
    elapsed = time.monotonic() - started
    assert answers[0]["status"] == 504
    assert elapsed < 2.8, f"the 1 s route timeout answered after {elapsed:.1f}s"


def test_abort_fault_at_its_percentage(mesh: Mesh) -> None:
    answers = mesh.get_json(
        "client", "http://faulty:9080/ratings/0", "--count", "1000", timeout=300
    )
    codes = collections.Counter(a["status"] for a in answers)
    assert set(codes) == {200, 418}, codes
    assert abs(100 * codes[418] / 1000 - 30) <= 5, codes


def test_route_change_applies_live_without_restarts_and_under_load(mesh: Mesh) -> None:
    before = started_at(mesh)
    with under_load(mesh, "20") as results:
        time.sleep(2)
        changed = route(mesh, "v1=0", "v2=100")
        changed_at = len(results)
        time.sleep(2)
    assert changed.returncode == 0, changed.stderr
    assert "80" in changed.stdout and "100" in changed.stdout  # old and new split shown
    assert all(r["status"] == 200 for r in results), collections.Counter(
        r["status"] for r in results
    )
    after = mesh.get_json("client", "http://reviews:9080/reviews/0", "--count", "200")
    assert versions(after) == {"v2": 200}
    assert started_at(mesh) == before, "a container restarted"
    assert changed_at > 0


def test_bad_route_is_refused_and_nothing_changes(mesh: Mesh) -> None:
    status_before = json.loads(composemesh("status", "-p", mesh.project, "--json").stdout)
    for args in (["v9=100"], ["v1=-1"], ["v1=abc"], ["v1=0", "v2=0"]):
        proc = route(mesh, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "error:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = composemesh("route", "nosuch", "v1=100", "-p", mesh.project)
    assert proc.returncode == 2 and "nosuch" in proc.stderr
    status_after = json.loads(composemesh("status", "-p", mesh.project, "--json").stdout)
    config = [{k: v for k, v in s["services"]["reviews"].items() if k != "traffic"}
              for s in (status_before, status_after)]  # traffic is a live rate, not config
    assert config[1] == config[0] and "split" in config[0]


def test_pilot_killed_keeps_last_split_and_resyncs_after_restart(mesh: Mesh) -> None:
    assert route(mesh, "v1=0", "v2=100").returncode == 0
    pilot = mesh.container("composemesh-pilot")
    docker("kill", pilot)
    try:
        answers = mesh.get_json("client", "http://reviews:9080/reviews/0", "--count", "100")
        assert versions(answers) == {"v2": 100}, "the proxies lost their last good snapshot"
    finally:
        docker("start", pilot)
    deadline = time.monotonic() + 60
    while True:  # the route change survived the restart: the split is still 0/100
        proc = composemesh("status", "-p", mesh.project, "--json")
        if proc.returncode == 0:
            data = json.loads(proc.stdout)
            if data["synced"] and all(p["in_sync"] for p in data["proxies"] if p["running"]):
                break
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.5)
    assert data["services"]["reviews"]["split"] == {"v1": 0, "v2": 100}
    assert route(mesh, "v1=100", "v2=0").returncode == 0
    answers = mesh.get_json("client", "http://reviews:9080/reviews/0", "--count", "100")
    assert versions(answers) == {"v1": 100}


def test_new_container_gets_traffic_without_a_command_and_a_stopped_one_fails_nothing(
    mesh: Mesh,
) -> None:
    assert route(mesh, "v1=0", "v2=100").returncode == 0
    before = started_at(mesh)
    files = [HERE / "compose.yaml", HERE / "reviews-v2b.yaml"]
    proc = composemesh("up", *sum((["-f", str(f)] for f in files), []), "-p", mesh.project)
    assert proc.returncode == 0, proc.stderr
    mesh.files = files  # so that the teardown removes reviews-v2b too
    after = started_at(mesh)
    assert {n: after[n] for n in before} == before, "adding a container restarted others"
    # no `route`, no restart: the new container of v2 takes its share of v2's traffic
    v2b_host = docker("inspect", "-f", "{{.Config.Hostname}}", mesh.container("reviews-v2b"))
    answers = mesh.get_json("client", "http://reviews:9080/reviews/0", "--count", "60")
    hosts = collections.Counter(a["host"] for a in answers)
    assert versions(answers) == {"v2": 60} and len(hosts) == 2, hosts
    assert hosts[v2b_host] >= 10, hosts

    with under_load(mesh, "10") as results:
        time.sleep(1)
        stopped = mesh.compose("stop", "reviews-v2b")
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(2)
    assert results, "no answers at all while reviews-v2b stopped"
    failed = [r for r in results if r["status"] != 200]
    assert len(failed) <= 1, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    tail = mesh.get_json("client", "http://reviews:9080/reviews/0", "--count", "50")
    assert versions(tail) == {"v2": 50}
    assert v2b_host not in {a["host"] for a in tail}


def test_status_shows_request_and_error_rates_per_version(mesh: Mesh) -> None:
    deadline = time.monotonic() + 60
    while True:
        mesh.get_json("client", "http://flaky:9080/ratings/0", "--count", "30")
        data = json.loads(composemesh("status", "-p", mesh.project, "--json").stdout)
        rate = data["services"]["flaky"].get("traffic", {}).get("v1")
        if rate and rate["rps"] > 0:
            break
        assert time.monotonic() < deadline, data["services"]["flaky"]
    assert 0 <= rate["error_ratio"] < 0.5  # retries hide the app's 503s from the caller
    table = composemesh("status", "-p", mesh.project)
    assert "req/s" in table.stdout and "errors" in table.stdout
