"""The tables the CLI prints: `status`, `certs`, a `route` change, `up`'s addresses.

Each builds rich renderables from the pilot's JSON answers and prints nothing; the console
passed in is the one they will be printed on (a table of proxies fits its width).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from composemesh.model.gateways import IngressGateway, ingress_urls

Column = tuple[str, Callable[[dict[str, Any]], Any]]  # heading, and the cell of a proxy
WHICH_PROXY: tuple[Column, ...] = (
    ("instance", lambda p: p["compose_service"]),
    ("service", lambda p: f"{p['service']} {p['version']}"),
)


def status_tables(data: dict[str, Any], console: Console) -> list[Table]:
    """The services of ``GET /v1/status`` (split, endpoints, traffic) if any, then its proxies."""
    tables = []
    services = data.get("services") or {}
    if services:
        table = Table(title=f"services of {data.get('project', '?')}")
        for col in ("service", "version", "weight", "endpoints", "req/s", "errors", "split from"):
            table.add_column(col)
        for name, info in services.items():
            versions = sorted(set(info["split"]) | set(info["endpoints"]))
            traffic = info.get("traffic") or {}
            for i, version in enumerate(versions):
                rate = traffic.get(version)
                table.add_row(
                    name if i == 0 else "",
                    version,
                    str(info["split"].get(version, 0)),
                    str(info["endpoints"].get(version, 0)),
                    f"{rate['rps']:.1f}" if rate else "—",
                    f"{100 * rate['error_ratio']:.1f}%" if rate else "—",
                    ("`route`" if info["overridden"] else "labels/config") if i == 0 else "",
                )
        tables.append(table)
    gateways = data.get("gateways") or []
    if gateways:
        table = Table(title=f"gateways of {data.get('project', '?')}")
        for col in ("gateway", "proxy", "config", "cert expires", "hosts", "routes", "req/s"):
            table.add_column(col)
        for g in gateways:
            table.add_row(
                g["gateway"], "ready" if g["ready"] else "starting",
                Text("in sync", style="green") if g["in_sync"] else Text("behind", "yellow"),
                expiry(g.get("cert_not_after"), relative_only=True), str(g["hosts"]),
                str(g["routes"]), "—" if g.get("rps") is None else f"{g['rps']:.1f}")
        tables.append(table)
    consul = data.get("consul")
    if consul:
        tables.append(consul_table(consul))
    tables.append(proxies_table(
        console, f"proxies of {data.get('project', '?')}", data.get("proxies", []), (
            *WHICH_PROXY,
            ("address", lambda p: (p["addresses"] or ["—"])[0]),
            ("proxy", lambda p: "ready" if p["proxy_healthy"]
             else ("starting" if p["running"] else "down")),
            ("config", config_state),
        ), (
            ("cert expires", lambda p: expiry(p.get("cert_not_after"), relative_only=True)),
        )))
    return tables


def consul_table(consul: dict[str, Any]) -> Table:
    """What this project exports to Consul and imports from it, per service; the caption says
    whether Consul answers."""
    if consul.get("reachable"):
        caption = Text(f"Consul at {consul['address']}: answering", style="green")
    else:
        caption = Text(f"Consul at {consul['address']}: not answering "
                       f"({consul.get('error') or 'not asked yet'})", style="red")
    table = Table(title="Consul", caption=caption)
    for col in ("service", "direction", "instances", "versions", "reached at"):
        table.add_column(col)
    gateway = f"{consul['host_address']}:{consul['east_west_port']}"
    for service, ids in (consul.get("exported") or {}).items():
        table.add_row(service, "exported", str(len(ids)), "—", f"{gateway} (east-west gateway)")
    for service, instances in (consul.get("imported") or {}).items():
        used = [i for i in instances if i["used"]]
        where = sorted({f"{i['address']}:{i['port']}" + ("" if i["mesh"] else " (plain TCP)")
                        for i in used})
        table.add_row(service, "imported", f"{len(used)} of {len(instances)}",
                      ", ".join(sorted({i["version"] for i in used})) or "—",
                      ", ".join(where) or "not used (see left out)")
    for reason in consul.get("left_out") or ():
        table.add_row("", "left out", "", "", Text(reason, style="yellow"))
    return table


def config_state(p: dict[str, Any]) -> Text:
    """``in sync`` (ACKed), ``behind``, or the NACK and its reason (versions: ``--json``)."""
    if p.get("nacked_version"):
        return Text(f"NACK: {p.get('nack_reason')}", style="red")
    if p.get("in_sync"):
        return Text("in sync" + ("" if p.get("acked_version") else ", no ACK"))
    return Text("behind", style="yellow")


def proxies_table(console: Console, title: str, proxies: Sequence[dict[str, Any]],
                  before: Sequence[Column], after: Sequence[Column]) -> Table:
    """A row per proxy: the ``before`` columns, its whole SPIFFE ID, the ``after`` columns.

    When the IDs would make the table wider than ``console`` and every one is
    ``spiffe://<td>/ns/<project>/sa/<service>``, that form is said once under the table
    instead of in a column (the service is in a column of its own already).
    """
    from rich.measure import Measurement

    rows = sorted(proxies, key=lambda p: (p["service"], p["version"], p["node"]))

    def build(identity: Sequence[Column], caption: str | None) -> Table:
        table = Table(title=title, caption=caption)
        columns = [*before, *identity, *after]
        for heading, _ in columns:
            table.add_column(heading, overflow="fold")
        for p in rows:
            table.add_row(*(cell(p) for _, cell in columns))
        return table

    full = build((("identity", lambda p: Text(p.get("identity") or "—")),), None)
    if Measurement.get(console, console.options.update_width(10_000), full).maximum \
            <= console.width:
        return full
    prefixes = {(p.get("identity") or "").rsplit("/", 1)[0] + "/" for p in proxies}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    if not prefix or any(p.get("identity") != prefix + p["service"] for p in proxies):
        return full  # some proxy's ID says what the service column does not: keep them all
    return build((), f"identity: {prefix}<service>")


def when(iso: str | None) -> str:
    """``2026-11-26 11:50:02 UTC`` from an ISO time; — for none."""
    if not iso:
        return "—"
    try:
        return f"{datetime.fromisoformat(iso).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    except ValueError:
        return escape(iso)


def expiry(not_after: str | None, now: datetime | None = None,
           relative_only: bool = False) -> str:
    """``2026-11-26 11:50:02 UTC (in 23h 59m)`` (or ``in 23h 59m``) from an ISO time; —."""
    if not not_after:
        return "—"
    try:
        moment = datetime.fromisoformat(not_after).astimezone(UTC)
    except ValueError:
        return escape(not_after)
    left = int((moment - (now or datetime.now(UTC))).total_seconds())
    if left <= 0:
        relative = "[red]expired[/]"
    else:
        days, rest = divmod(left, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        if days:
            relative = f"in {days}d {hours}h"
        elif hours:
            relative = f"in {hours}h {minutes}m"
        else:
            relative = f"in {minutes}m {seconds}s"
    return relative if relative_only else f"{when(not_after)} ({relative})"


def certs_tables(ca: dict[str, Any], data: dict[str, Any], console: Console) -> list[Table]:
    """The root CA of ``GET /v1/ca``, then each proxy's identity and certificate."""
    bundle = str(ca.get("trust_bundle_pem") or "")
    roots = bundle.count("-----BEGIN CERTIFICATE-----")
    table = Table(title=f"root CA of {ca.get('project', data.get('project', '?'))}")
    table.add_column("")
    table.add_column("", overflow="fold")
    table.show_header = False
    rows = (
        ("subject", Text(str(ca.get("subject", "?")))),  # Text: no markup, no :emoji:
        ("fingerprint", Text(str(ca.get("fingerprint", "?")))),
        ("not before", when(ca.get("not_before"))),
        ("not after", expiry(ca.get("not_after"))),
        ("trust bundle", f"{roots} root{'s' if roots != 1 else ''}, {len(bundle.encode())} bytes"),
        ("trust domain", str(ca.get("trust_domain", "?"))),
        ("rotation", {"trusting": "under way: the new root is trusted, the old one signs",
                      "switched": "under way: the new root signs, the old one is trusted"}.get(
                          str(ca.get("rotation_phase")), "none under way")),
        ("root", {"user": "the user's own", "generated": "generated by the pilot (new)",
                  "stored": "generated by the pilot"}.get(str(ca.get("source")), "?")),
        ("workload certificates", f"live {duration(ca.get('workload_ttl_s'))}; "
                                  f"{ca.get('signed', 0)} signed since the pilot started"),
    )
    for name, value in rows:
        table.add_row(name, value)
    identities = proxies_table(console, f"identities of {data.get('project', '?')}",
                               data.get("proxies", []), WHICH_PROXY, (
        ("serial", lambda p: Text(p.get("cert_serial") or "—")),
        ("expires", lambda p: expiry(p.get("cert_not_after")) if p.get("identity")
         else "[yellow]no certificate[/]"),
    ))
    return [table, identities]


def duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def route_table(service: str, result: dict[str, Any]) -> Table:
    """A `route` change: each version's weight before and after (``PUT /v1/routes/...``)."""
    table = Table(title=f"{service}: split changed")
    for col in ("version", "before", "after"):
        table.add_column(col)
    for version in sorted(set(result["old"]) | set(result["new"])):
        table.add_row(
            version, f"{result['old'].get(version, 0)}", f"{result['new'].get(version, 0)}"
        )
    return table


def ingress_table(ingress: IngressGateway) -> Table:
    """The ingress gateway's URLs, and how to reach each from this machine."""
    table = Table(title="ingress")
    for col in ("host", "url", "from this machine"):
        table.add_column(col)
    for row in ingress_urls(ingress):
        table.add_row(*row)
    return table


def endpoints_table(rows: Sequence[tuple[str, str, str]]) -> Table | None:
    """Where `up` says to reach the apps: service, container port, address; None if none."""
    if not rows:
        return None
    table = Table(title="reach it at")
    for col in ("service", "port", "address"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table
