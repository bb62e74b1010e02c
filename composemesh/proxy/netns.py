"""The `composemesh netns` holder: installs the capture rules, then holds the namespace open."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from types import FrameType

from composemesh.model import wellknown as wk
from composemesh.proxy.capture import (
    DEFAULT_EXCLUDE_INBOUND_PORTS,
    CaptureError,
    Rule,
    apply_rules,
    capture_rules,
    format_rule,
    parse_ports,
)

ENV_EXCLUDE_INBOUND = wk.ENV_EXCLUDE_INBOUND  # added to the proxy's own ports
ENV_EXCLUDE_OUTBOUND = wk.ENV_EXCLUDE_OUTBOUND


def rules_from_env(environ: Mapping[str, str]) -> list[Rule]:
    """The capture rules with the exclusions the environment asks for (pure)."""
    inbound = DEFAULT_EXCLUDE_INBOUND_PORTS + parse_ports(environ.get(ENV_EXCLUDE_INBOUND))
    outbound = parse_ports(environ.get(ENV_EXCLUDE_OUTBOUND))
    dns = wk.PORT_DNS if environ.get(wk.ENV_CAPTURE_DNS, "").lower() == "true" else None
    return capture_rules(exclude_inbound_ports=inbound, exclude_outbound_ports=outbound,
                         dns_port=dns)


def run_netns_holder(environ: Mapping[str, str] | None = None) -> int:
    """Apply the capture rules, print them, then sleep until SIGTERM/SIGINT, which exits 0.

    Returns (1) only when the rules cannot be applied; the message is on stderr.

    It is PID 1 of its container: the kernel gives PID 1 no default signal actions, so the
    handlers are installed explicitly, before anything slow happens.
    """
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    environ = os.environ if environ is None else environ
    try:
        rules = rules_from_env(environ)
        binary = apply_rules(rules)
    except CaptureError as exc:
        print(f"composemesh netns: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"composemesh netns: capture rules applied ({binary}):", flush=True)
    for rule in rules:
        print("  " + format_rule(binary, rule), flush=True)
    signal.signal(signal.SIGCHLD, _reap_children)  # orphans of `docker exec` land on PID 1
    while True:
        signal.pause()


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def _reap_children(signum: int, frame: FrameType | None) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
