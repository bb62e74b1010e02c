"""Fixtures of the proxy tests: both event loops, and network namespaces of our own."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
_names = itertools.count()


def run_on(loop_kind: str, main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the stdlib loop or on uvloop: the data path must behave the same on both."""
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def netns_unavailable() -> str | None:
    """Why this host cannot run the namespace tests, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "iptables", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Makes network namespaces (lo up) named cmt<pid>x<n>; deletes them afterwards.
    A host that cannot is a skip, but in CI a failure (as the e2e tests' missing engine)."""
    reason = netns_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"network namespace tests cannot run: {reason}")
        pytest.skip(reason)
    created: list[str] = []

    def make() -> str:
        name = f"cmt{os.getpid()}x{next(_names)}"
        sh("ip", "netns", "add", name)
        created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    yield make
    for name in reversed(created):
        sh("ip", "netns", "del", name, check=False)


class Processes:
    """Processes a test started; each is ended by its own pid at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None,
              log: str | None = None) -> subprocess.Popen[str]:
        """Start ``argv``; its output goes to pipes, or to the file ``log`` (both streams)."""
        out: Any = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True,
        )
        if log:
            out.close()
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)


def wait_for_text(path: str, text: str, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    """Wait until the log file ``path`` says ``text``; fail with the log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as log:
            if text in log.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(path) as log:
        raise AssertionError(f"{text!r} never appeared (exit {proc.poll()}):\n{log.read()}")


@pytest.fixture
def processes(netns: Callable[[], str]) -> Iterator[Processes]:
    """Started after (so stopped before) the namespaces they run in are deleted."""
    procs = Processes()
    yield procs
    procs.stop_all()
