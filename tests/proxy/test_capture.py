"""The capture rules: their content (pure) and applying them to a real namespace's nat table."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

import pytest

from composemesh.model.wellknown import (
    PORT_ADMIN,
    PORT_HEALTH,
    PORT_INBOUND,
    PORT_OUTBOUND,
    PORT_PROMETHEUS,
)
from composemesh.proxy.capture import (
    CHAIN_IN_REDIRECT,
    CHAIN_INBOUND,
    CHAIN_OUTBOUND,
    CHAIN_REDIRECT,
    DEFAULT_EXCLUDE_INBOUND_PORTS,
    CaptureError,
    apply_rules,
    capture_rules,
    current_rules,
    parse_ports,
    reset_rules,
)

from .conftest import sh


def chain(rules: list[list[str]], name: str) -> list[list[str]]:
    """The rules appended to chain ``name``, in order, without the "-t nat -A NAME" prefix."""
    return [r[4:] for r in rules if r[2:4] == ["-A", name]]


def test_every_rule_is_in_the_nat_table() -> None:
    assert all(rule[:2] == ["-t", "nat"] for rule in capture_rules())


def test_only_tcp_is_sent_to_our_chains() -> None:
    rules = capture_rules()
    assert chain(rules, "PREROUTING") == [["-p", "tcp", "-j", CHAIN_INBOUND]]
    assert chain(rules, "OUTPUT") == [["-p", "tcp", "-j", CHAIN_OUTBOUND]]


def test_outbound_lets_the_proxys_own_uid_through_first() -> None:
    outbound = chain(capture_rules(proxy_uid=1337), CHAIN_OUTBOUND)
    assert outbound[0] == ["-m", "owner", "--uid-owner", "1337", "-j", "RETURN"]
    assert outbound[-1] == ["-j", CHAIN_REDIRECT]


def test_outbound_keeps_loopback_uncaptured_before_the_redirect() -> None:
    outbound = chain(capture_rules(), CHAIN_OUTBOUND)
    loopback = outbound.index(["-d", "127.0.0.0/8", "-j", "RETURN"])
    assert loopback < outbound.index(["-j", CHAIN_REDIRECT])


def test_redirect_targets_are_the_capture_ports() -> None:
    rules = capture_rules(inbound_port=15006, outbound_port=15001)
    assert chain(rules, CHAIN_REDIRECT) == [
        ["-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"]]
    assert chain(rules, CHAIN_IN_REDIRECT) == [
        ["-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"]]


def test_inbound_excludes_only_the_health_and_metrics_ports_then_redirects() -> None:
    """15021 and 15090 are the proxy's own, served on the namespace's addresses; every other
    port, the admin (loopback only), the capture ports and the pilot's old 15010 included, is
    captured: nothing the app listens on is reachable around its proxy."""
    inbound = chain(capture_rules(), CHAIN_INBOUND)
    assert inbound == [
        ["-p", "tcp", "-m", "multiport", "--dports", "15021,15090", "-j", "RETURN"],
        ["-p", "tcp", "-j", CHAIN_IN_REDIRECT],
    ]
    assert DEFAULT_EXCLUDE_INBOUND_PORTS == (PORT_HEALTH, PORT_PROMETHEUS) == (15021, 15090)
    excluded = {p for rule in inbound if "--dports" in rule
                for p in rule[rule.index("--dports") + 1].split(",")}
    assert excluded.isdisjoint({str(p) for p in (PORT_ADMIN, PORT_OUTBOUND, PORT_INBOUND,
                                                 15010, 15012)})


def test_excluded_outbound_ports_and_cidrs_return_before_the_redirect() -> None:
    outbound = chain(capture_rules(exclude_outbound_ports=(5432,),
                                   exclude_outbound_cidrs=("10.9.0.0/16",)), CHAIN_OUTBOUND)
    assert outbound[2:] == [
        ["-p", "tcp", "--dport", "5432", "-j", "RETURN"],
        ["-d", "10.9.0.0/16", "-j", "RETURN"],
        ["-j", CHAIN_REDIRECT],
    ]


def test_many_excluded_ports_are_split_into_multiport_groups_of_15() -> None:
    inbound = chain(capture_rules(exclude_inbound_ports=range(8000, 8020)), CHAIN_INBOUND)
    groups = [rule[rule.index("--dports") + 1].split(",") for rule in inbound[:-1]]
    assert [len(g) for g in groups] == [15, 5]


def test_reset_undoes_our_jumps_and_chains_only() -> None:
    undo = reset_rules(capture_rules())
    assert ["-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", CHAIN_INBOUND] in undo
    assert ["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", CHAIN_OUTBOUND] in undo
    flushed = {rule[3] for rule in undo if rule[2] in ("-F", "-X")}
    assert flushed == {CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTBOUND, CHAIN_REDIRECT}
    # Jumps go before the chains they point to are deleted.
    first_delete = min(i for i, rule in enumerate(undo) if rule[2] == "-X")
    assert max(i for i, rule in enumerate(undo) if rule[2] == "-D") < first_delete


def test_parse_ports() -> None:
    assert parse_ports(" 8080, 9090 ,") == (8080, 9090)
    assert parse_ports(None) == ()
    with pytest.raises(CaptureError, match="not a TCP port: 'http'"):
        parse_ports("8080,http")
    with pytest.raises(CaptureError):
        parse_ports("70000")


def test_apply_names_the_failing_rule_and_the_missing_capability() -> None:
    """A fake runner stands in for iptables refusing us (as it does without NET_ADMIN)."""

    def refuse(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        said = "Permission denied (you must be root)"
        return subprocess.CompletedProcess(list(argv), 4, "", said)

    with pytest.raises(CaptureError, match="Permission denied.*NET_ADMIN"):
        apply_rules(capture_rules(), binary="iptables", run=refuse)


def in_netns(name: str) -> Callable[[Sequence[str]], subprocess.CompletedProcess[str]]:
    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", name, *argv],
                              capture_output=True, text=True, check=False)

    return run


def test_apply_is_idempotent_and_leaves_dockers_rules_alone(netns: Callable[[], str]) -> None:
    ns = netns()
    run = in_netns(ns)
    # What dockerd puts in every container's namespace for its embedded DNS.
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-N", "DOCKER_OUTPUT")
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT",
       "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT")
    sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "DOCKER_OUTPUT",
       "-d", "127.0.0.11/32", "-p", "tcp", "--dport", "53", "-j", "DNAT",
       "--to-destination", "127.0.0.11:40000")

    rules = capture_rules()
    binary = apply_rules(rules, run=run)
    assert binary == "iptables"
    first = current_rules(binary, run=run)
    apply_rules(rules, binary, run=run)
    second = current_rules(binary, run=run)

    assert first == second
    assert "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT" in second
    assert any("DNAT" in line and "127.0.0.11:40000" in line for line in second)
    assert second.count("-A OUTPUT -p tcp -j COMPOSEMESH_OUTBOUND") == 1
    assert "-A COMPOSEMESH_OUTBOUND -m owner --uid-owner 1337 -j RETURN" in second
    assert "-A COMPOSEMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in second

    # A changed exclusion replaces the old rules rather than piling up beside them.
    apply_rules(capture_rules(exclude_outbound_ports=(5432,)), binary, run=run)
    third = current_rules(binary, run=run)
    assert "-A COMPOSEMESH_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN" in third
    assert len(third) == len(second) + 1


def test_dns_capture_comes_first_in_output_spares_the_proxy_and_is_undone() -> None:
    """A federated mesh's holders send the app's UDP to Docker's DNS to the proxy's resolver,
    ahead of Docker's own DNAT of 127.0.0.11 (which the proxy's own queries still take)."""
    from composemesh.proxy.capture import CHAIN_DNS
    from composemesh.proxy.netns import rules_from_env

    rules = capture_rules(dns_port=15053)
    assert ["-t", "nat", "-I", "OUTPUT", "1", "-p", "udp", "-d", "127.0.0.11/32", "--dport",
            "53", "-j", CHAIN_DNS] in rules
    owner = rules.index(["-t", "nat", "-A", CHAIN_DNS, "-m", "owner", "--uid-owner", "1337",
                         "-j", "RETURN"])
    redirect = rules.index(["-t", "nat", "-A", CHAIN_DNS, "-p", "udp", "-j", "REDIRECT",
                            "--to-ports", "15053"])
    assert owner < redirect
    undo = reset_rules(rules)
    assert ["-t", "nat", "-D", "OUTPUT", "-p", "udp", "-d", "127.0.0.11/32", "--dport", "53",
            "-j", CHAIN_DNS] in undo
    assert ["-t", "nat", "-X", CHAIN_DNS] in undo
    assert not any(CHAIN_DNS in rule for rule in capture_rules())  # off unless asked
    assert any(CHAIN_DNS in r for r in rules_from_env({"COMPOSEMESH_CAPTURE_DNS": "true"}))
    assert not any(CHAIN_DNS in r for r in rules_from_env({}))
