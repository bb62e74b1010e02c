"""Helpers every kind of test uses: a free port to listen on, and waiting for a condition.

(bench/_common.py has its own ``free_port``: the tests import the benchmarks, so the
benchmarks do not import the tests.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on ``host`` (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def until(condition: Callable[[], bool], timeout: float = 10.0,
                interval: float = 0.001) -> None:
    """Return once ``condition()`` holds, checking every ``interval`` seconds; TimeoutError
    after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(interval)
