"""Runs a command, feeding each non-empty output line to a callback: the one subprocess edge."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence


def stream_lines(
    cmd: Sequence[str],
    on_line: Callable[[str], None] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    keep: int | None = None,
) -> tuple[int, list[str]]:
    """Exit code and the output lines (stdout and stderr together; the last ``keep`` only).

    A command that cannot be started at all answers 127 with the reason as its only line.
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            text=True,
            errors="replace",
        )
    except OSError as err:
        return 127, [f"cannot run {cmd[0]}: {err}"]
    assert proc.stdout is not None
    lines: list[str] = []
    for raw in proc.stdout:
        line = raw.rstrip()
        if not line:
            continue
        lines.append(line)
        if keep is not None and len(lines) > keep:
            del lines[0]
        if on_line:
            on_line(line)
    return proc.wait(), lines
