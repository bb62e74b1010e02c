"""The `composemesh netns` holder, run for real in a network namespace of our own."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from composemesh.proxy.capture import CHAIN_INBOUND, CHAIN_OUTBOUND
from composemesh.proxy.netns import rules_from_env

from .conftest import PYTHON, Processes, sh

HOLDER = "import sys; from composemesh.proxy.netns import run_netns_holder; " \
         "sys.exit(run_netns_holder())"


def test_env_adds_exclusions_to_the_proxy_ports() -> None:
    rules = rules_from_env({"COMPOSEMESH_EXCLUDE_INBOUND_PORTS": "22",
                            "COMPOSEMESH_EXCLUDE_OUTBOUND_PORTS": "5432,6379"})
    inbound = [r for r in rules if r[2:4] == ["-A", CHAIN_INBOUND]]
    outbound = [r for r in rules if r[2:4] == ["-A", CHAIN_OUTBOUND]]
    assert inbound[0][inbound[0].index("--dports") + 1] == "22,15021,15090"
    assert outbound[2][4:] == \
        ["-p", "tcp", "-m", "multiport", "--dports", "5432,6379", "-j", "RETURN"]


def test_holder_applies_rules_sleeps_and_exits_0_on_sigterm(
    netns: Callable[[], str], processes: Processes,
) -> None:
    ns = netns()
    holder = processes.start(["ip", "netns", "exec", ns, PYTHON, "-c", HOLDER])
    assert holder.stdout is not None
    first = holder.stdout.readline()
    assert "capture rules applied (iptables)" in first
    rules = sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S").stdout
    assert "-A PREROUTING -p tcp -j COMPOSEMESH_INBOUND" in rules
    assert "-A COMPOSEMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules

    time.sleep(0.3)
    pid = holder.pid
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    state, utime_ticks = fields[0], int(fields[11])
    assert state == "S"  # asleep, not spinning
    assert utime_ticks < 100

    holder.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert holder.wait(timeout=5) == 0
    assert time.monotonic() - started < 1.0


def test_holder_exits_1_and_says_why_without_net_admin(
    netns: Callable[[], str], processes: Processes,
) -> None:
    ns = netns()
    holder = processes.start(["ip", "netns", "exec", ns, "setpriv", "--reuid", "1337",
                              "--regid", "1337", "--clear-groups", PYTHON, "-c", HOLDER])
    _, err = holder.communicate(timeout=30)
    assert holder.returncode == 1
    assert "NET_ADMIN" in err
    assert "Traceback" not in err
