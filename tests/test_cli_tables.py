"""The tables `status` and `certs` print: whole SPIFFE IDs when they fit, else said once."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from composemesh import cli

PREFIX = "spiffe://cluster.local/ns/shop/sa/"


def proxy(service: str, instance: str, identity: str | None = "") -> dict[str, Any]:
    return {
        "service": service, "version": "v1", "node": f"shop-{instance}-netns-1",
        "compose_service": instance, "addresses": ["192.168.96.3"], "proxy_healthy": True,
        "running": True, "in_sync": True, "acked_version": "a1", "nacked_version": None,
        "nack_reason": None, "identity": PREFIX + service if identity == "" else identity,
        "cert_serial": "30cb37263606dc44994de13c5b068ff2b797b101",
        "cert_not_after": "2099-01-01T00:00:00+00:00",
    }


def printed(monkeypatch: pytest.MonkeyPatch, width: int, proxies: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=width, highlight=False))
    cli._print_status({"project": "shop", "services": {}, "proxies": proxies})
    cli._print_certs({"fingerprint": "SHA256:aa"}, {"project": "shop", "proxies": proxies})
    return buffer.getvalue()


def test_wide_consoles_show_each_whole_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    text = printed(monkeypatch, 220, [proxy("reviews", "reviews-v1"), proxy("web", "web")])
    rows = [line for line in text.splitlines() if "reviews-v1" in line]
    assert len(rows) == 2 and all(f"{PREFIX}reviews " in row for row in rows)
    assert "<service>" not in text


def test_narrow_consoles_say_the_identity_form_once(monkeypatch: pytest.MonkeyPatch) -> None:
    text = printed(monkeypatch, 80, [proxy("reviews", "reviews-v1"), proxy("web", "web")])
    assert text.count(f"identity: {PREFIX}<service>") == 2  # under each table
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "in sync" in text and "reviews v1" in text


def test_an_identity_that_is_not_the_services_is_always_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    odd = [proxy("reviews", "reviews-v1"), proxy("web", "web", identity=None)]
    text = printed(monkeypatch, 80, odd)
    assert "<service>" not in text and "no certificate" in text


def test_status_shows_the_gateways_with_their_routes_and_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=160, highlight=False))
    gateway = {"gateway": "ingress-gateway", "node": "shop-ingress-gateway-netns-1",
               "ready": True, "in_sync": True, "cert_not_after": "2099-01-01T00:00:00+00:00",
               "hosts": 2, "routes": 3, "rps": 12.5}
    cli._print_status({"project": "shop", "services": {}, "gateways": [gateway],
                       "proxies": [proxy("ingress-gateway", "ingress-gateway")]})
    text = buffer.getvalue()
    assert "gateways of shop" in text
    row = next(line for line in text.splitlines() if "ingress-gateway" in line and "12.5" in line)
    assert "ready" in row and "in sync" in row and " 2 " in row and " 3 " in row
