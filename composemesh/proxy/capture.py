"""The iptables rules that send an app's TCP through its proxy, and applying them idempotently."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence

from composemesh.errors import MeshError
from composemesh.model.wellknown import (
    DOCKER_DNS,
    PORT_HEALTH,
    PORT_INBOUND,
    PORT_OUTBOUND,
    PORT_PROMETHEUS,
    PROXY_UID,
)

CHAIN_INBOUND = "COMPOSEMESH_INBOUND"  # PREROUTING jumps here: decides what inbound TCP to capture
CHAIN_IN_REDIRECT = "COMPOSEMESH_IN_REDIRECT"  # REDIRECT to the inbound capture port
CHAIN_OUTBOUND = "COMPOSEMESH_OUTBOUND"  # OUTPUT jumps here: decides what outbound TCP to capture
CHAIN_REDIRECT = "COMPOSEMESH_REDIRECT"  # REDIRECT to the outbound capture port
CHAIN_DNS = "COMPOSEMESH_DNS"  # the app's UDP to Docker's DNS, to the proxy's resolver
OUR_CHAINS = (CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTBOUND, CHAIN_REDIRECT)

# Inbound connections left uncaptured: only the ports the proxy itself serves on the
# namespace's addresses (health, Prometheus), which the app cannot take (the proxy holds them
# before the app starts). Its admin port listens on loopback, which capture never sees; a
# connection from outside to 15000, 15001 or 15006 on the namespace's address is captured and
# then dropped as one aimed at the proxy itself (``tcp.is_proxy_address``, counted as a
# "loop"). Any other port, whatever listens there, goes through the proxy.
DEFAULT_EXCLUDE_INBOUND_PORTS = (PORT_HEALTH, PORT_PROMETHEUS)
LOOPBACK_CIDR = "127.0.0.0/8"  # Docker's embedded DNS (127.0.0.11) and app-local traffic
IPTABLES_BINARIES = ("iptables", "iptables-legacy")
_MULTIPORT_MAX = 15  # iptables' multiport match takes at most 15 ports per rule

Rule = list[str]
Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class CaptureError(MeshError):
    """The capture rules could not be read or applied (no iptables, no NET_ADMIN, bad rule)."""


def capture_rules(
    proxy_uid: int = PROXY_UID,
    inbound_port: int = PORT_INBOUND,
    outbound_port: int = PORT_OUTBOUND,
    exclude_inbound_ports: Iterable[int] = DEFAULT_EXCLUDE_INBOUND_PORTS,
    exclude_outbound_ports: Iterable[int] = (),
    exclude_outbound_cidrs: Iterable[str] = (),
    dns_port: int | None = None,
) -> list[Rule]:
    """The iptables argument lists (nat table) that capture inbound and outbound TCP, in order.

    Inbound: PREROUTING -> COMPOSEMESH_INBOUND -> RETURN for excluded ports ->
    COMPOSEMESH_IN_REDIRECT.
    Outbound: OUTPUT -> COMPOSEMESH_OUTBOUND -> RETURN for the proxy's own uid, for loopback
    destinations and for excluded ports/CIDRs -> COMPOSEMESH_REDIRECT.
    DNS (with ``dns_port``, a federated mesh's): the first rule of OUTPUT sends UDP to
    Docker's DNS (127.0.0.11:53) -> COMPOSEMESH_DNS -> RETURN for the proxy's own uid ->
    REDIRECT to ``dns_port`` (the proxy's DNS, ``proxy.dns``); it comes before
    Docker's own DNAT of that address, which the proxy's own queries still take.
    """
    nat = ["-t", "nat"]
    rules: list[Rule] = [[*nat, "-N", chain] for chain in OUR_CHAINS]
    rules.append([*nat, "-A", CHAIN_REDIRECT, "-p", "tcp", "-j", "REDIRECT",
                  "--to-ports", str(outbound_port)])
    rules.append([*nat, "-A", CHAIN_IN_REDIRECT, "-p", "tcp", "-j", "REDIRECT",
                  "--to-ports", str(inbound_port)])

    rules.append([*nat, "-A", "PREROUTING", "-p", "tcp", "-j", CHAIN_INBOUND])
    for group in _port_groups(exclude_inbound_ports):
        rules.append([*nat, "-A", CHAIN_INBOUND, "-p", "tcp", *_dports(group), "-j", "RETURN"])
    rules.append([*nat, "-A", CHAIN_INBOUND, "-p", "tcp", "-j", CHAIN_IN_REDIRECT])

    rules.append([*nat, "-A", "OUTPUT", "-p", "tcp", "-j", CHAIN_OUTBOUND])
    rules.append([*nat, "-A", CHAIN_OUTBOUND, "-m", "owner", "--uid-owner", str(proxy_uid),
                  "-j", "RETURN"])
    rules.append([*nat, "-A", CHAIN_OUTBOUND, "-d", LOOPBACK_CIDR, "-j", "RETURN"])
    for group in _port_groups(exclude_outbound_ports):
        rules.append([*nat, "-A", CHAIN_OUTBOUND, "-p", "tcp", *_dports(group), "-j", "RETURN"])
    for cidr in exclude_outbound_cidrs:
        rules.append([*nat, "-A", CHAIN_OUTBOUND, "-d", cidr, "-j", "RETURN"])
    rules.append([*nat, "-A", CHAIN_OUTBOUND, "-j", CHAIN_REDIRECT])
    if dns_port is not None:
        rules += [
            [*nat, "-N", CHAIN_DNS],
            [*nat, "-A", CHAIN_DNS, "-m", "owner", "--uid-owner", str(proxy_uid), "-j", "RETURN"],
            [*nat, "-A", CHAIN_DNS, "-p", "udp", "-j", "REDIRECT", "--to-ports", str(dns_port)],
            [*nat, "-I", "OUTPUT", "1", "-p", "udp", "-d", f"{DOCKER_DNS}/32", "--dport", "53",
             "-j", CHAIN_DNS],
        ]
    return rules


def reset_rules(rules: Sequence[Rule]) -> list[Rule]:
    """The argument lists that undo ``rules``: our jumps from built-in chains, then our chains.

    Each may fail harmlessly (nothing to undo); run them all, ignoring failures.
    """
    ours = {rule[rule.index("-N") + 1] for rule in rules if "-N" in rule}
    table = _table(rules)
    undo: list[Rule] = []
    for rule in rules:
        if "-A" in rule:
            at = rule.index("-A")
            chain, rest = rule[at + 1], rule[at + 2:]
        elif "-I" in rule:
            at = rule.index("-I")
            chain, rest = rule[at + 1], rule[at + 2:]
            if rest and rest[0].isdigit():  # the position it was inserted at
                rest = rest[1:]
        else:
            continue
        if chain not in ours and rule[-1] in ours:  # a jump from a built-in chain into ours
            undo.append([*rule[:at], "-D", chain, *rest])
    undo.extend(["-t", table, "-F", chain] for chain in sorted(ours))
    undo.extend(["-t", table, "-X", chain] for chain in sorted(ours))
    return undo


def parse_ports(value: str | None) -> tuple[int, ...]:
    """Ports from a comma-separated environment value ("15000, 8080"); raise CaptureError if bad."""
    if not value or not value.strip():
        return ()
    ports = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise CaptureError(f"not a TCP port: {item!r} (in {value!r})")
        ports.append(int(item))
    return tuple(ports)


def detect_iptables(run: Runner | None = None) -> str:
    """The iptables binary to use: ``iptables`` (nf_tables) unless only ``iptables-legacy`` works.

    When both work, the one that already holds rules in the nat table (dockerd's, for its DNS)
    wins, so that ours live beside them.
    """
    run = run or _run
    working: list[str] = []
    for binary in IPTABLES_BINARIES:
        if shutil.which(binary) is None:
            continue
        try:
            result = run([binary, "-w", "-t", "nat", "-S"])
        except OSError:
            continue
        if result.returncode != 0:
            continue
        if any(line.startswith(("-A", "-N")) for line in result.stdout.splitlines()):
            return binary
        working.append(binary)
    if working:
        return working[0]
    raise CaptureError(
        "iptables does not work here (tried " + ", ".join(IPTABLES_BINARIES) + "): "
        "the netns container needs the NET_ADMIN capability and an image with iptables"
    )


def apply_rules(rules: Sequence[Rule], binary: str | None = None, run: Runner | None = None) -> str:
    """Remove any rules of ours, then apply ``rules`` in order; return the binary used.

    Idempotent: running it again leaves the same rules. Rules of others (dockerd's DNS NAT)
    are never touched. Raise CaptureError naming the failing rule and what iptables said.
    """
    run = run or _run
    binary = binary or detect_iptables(run)
    for undo in reset_rules(rules):
        for _ in range(16):  # a jump may have been added more than once by someone else
            if run([binary, "-w", *undo]).returncode != 0 or "-D" not in undo:
                break
    for rule in rules:
        result = run([binary, "-w", *rule])
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()
            raise CaptureError(
                f"{binary} {' '.join(rule)} failed: {said or 'exit ' + str(result.returncode)}"
                " (does the netns container have the NET_ADMIN capability?)"
            )
    return binary


def current_rules(binary: str | None = None, run: Runner | None = None) -> list[str]:
    """The nat table as ``iptables -S`` prints it (ours and everyone else's)."""
    run = run or _run
    binary = binary or detect_iptables(run)
    result = run([binary, "-w", "-t", "nat", "-S"])
    if result.returncode != 0:
        raise CaptureError(f"{binary} -t nat -S failed: {result.stderr.strip()}")
    return result.stdout.splitlines()


def format_rule(binary: str, rule: Sequence[str]) -> str:
    """One rule as the shell command a person would type."""
    return " ".join([binary, *rule])


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _table(rules: Sequence[Rule]) -> str:
    for rule in rules:
        if "-t" in rule:
            return rule[rule.index("-t") + 1]
    return "filter"


def _port_groups(ports: Iterable[int]) -> list[list[int]]:
    unique = sorted(set(ports))
    return [unique[i:i + _MULTIPORT_MAX] for i in range(0, len(unique), _MULTIPORT_MAX)]


def _dports(group: list[int]) -> list[str]:
    if len(group) == 1:
        return ["--dport", str(group[0])]
    return ["-m", "multiport", "--dports", ",".join(str(p) for p in group)]
