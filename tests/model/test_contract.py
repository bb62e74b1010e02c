"""The pilot–proxy contract on the wire: pinned field by field, every field checked on decode.

``snapshot_wire.json`` beside this file is a rich snapshot as the wire carries it. A field
renamed, retyped or dropped in ``model.snapshot`` (or in the routing and policy values a
snapshot carries) changes those bytes or no longer reads them back, and fails here: a proxy
of one release must read the snapshots of the pilot of the same release, whatever a
refactoring renames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from composemesh.model.egress import EgressHostSpec, EgressOrigination, EgressSettings
from composemesh.model.ingress import IngressHostSpec, IngressPath, IngressSettings
from composemesh.model.mesh import NetworkAttachment
from composemesh.model.monitoring import Telemetry, TracingSettings
from composemesh.model.policy import Operation, Policy
from composemesh.model.routing import (
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    RetryPolicy,
    ServiceRouting,
    StringMatch,
    WeightedSubset,
)
from composemesh.model.snapshot import (
    Ack,
    CertificateResponse,
    DeclaredProtocols,
    ErrorResponse,
    ProxyIdentity,
    ServiceEndpoint,
    Snapshot,
    SnapshotError,
    SnapshotSettings,
    decode_snapshot,
    encode_snapshot,
)
from composemesh.model.wire import ContractError, content_version, decode, encode
from composemesh.proxy.pilot_client import ConfigStore

GOLDEN = Path(__file__).with_name("snapshot_wire.json")

ROUTING = ServiceRouting(
    service="reviews",
    routes=(
        HttpRoute(
            name="jason",
            matches=(HttpMatch(path=StringMatch("prefix", "/r"),
                               headers=(("end-user", StringMatch("exact", "jason")),),
                               method="GET"),),
            destinations=(WeightedSubset("v2", 90), WeightedSubset("v3", 10)),
            retries=RetryPolicy(attempts=2, per_try_timeout_s=0.5,
                                retry_on=frozenset({"reset", "5xx"}), retry_non_idempotent=True),
            timeout_s=1.5,
            fault=FaultPolicy(delay=FaultDelay(0.1, 5.0), abort=FaultAbort(503, 1.0)),
        ),
        HttpRoute(name="default", matches=(), destinations=(WeightedSubset("v1", 1),)),
    ),
    load_balancer="least_request",
    outlier=OutlierPolicy(consecutive_errors=3, base_ejection_s=10.0, max_ejection_percent=20),
    connect_timeout_s=2.0,
)

SNAPSHOT = Snapshot(
    version="abc123",
    identity=ProxyIdentity("shop-reviews-v1-netns-1", "shop", "reviews-v1", "reviews", "v1"),
    settings=SnapshotSettings(
        trust_domain="shop.example",
        mtls_mode="PERMISSIVE",
        services={"reviews": (
            ServiceEndpoint("shop-reviews-v1-netns-1", "v1", "10.0.0.5", ("10.0.0.5", "10.1.0.5")),
            ServiceEndpoint("vm-reviews", "v2", "10.0.9.9", compose_service="reviews-vm"),
            ServiceEndpoint("shop-reviews-v3-1@192.0.2.10", "v3", "192.0.2.10", port=15443,
                            locality="remote", peer="spiffe://shop.example/ns/shop/sa/reviews",
                            sni="v3_.reviews.shop.svc.shop.example"),
            ServiceEndpoint("vm-ratings-1", "v1", "192.0.2.77", port=9080, locality="remote",
                            plaintext=True),
        )},
        dns={"payments": "240.241.10.3"},
        federated=True,
        idle_addresses={"ratings": ("10.0.0.8",)},
        routing={"reviews": ROUTING},
        protocols={"reviews": DeclaredProtocols("http", {"9090": "tcp"}),
                   "ratings": DeclaredProtocols()},
        trust_bundle="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        signing_root="SHA256:ab:cd",
        policies={"reviews": (
            Policy("pp", sources=frozenset({"productpage", "*"}),
                   operations=(Operation(methods=frozenset({"POST", "GET"}), paths=("/a/*",)),)),
            Policy("no-admin", action="DENY", operations=(Operation(paths=("/admin",)),)),
        )},
        published_ports=(443, 9080),
        networks=(NetworkAttachment("shop_back", "10.0.0.5", "10.0.0.0/24", "10.0.0.1"),),
        ingress=IngressSettings(
            http=True, https=True, redirect_to_https=True, public_https_port=8443,
            hosts=(IngressHostSpec("www.example.com", tls=True, routes=(
                IngressPath("/api/", "api", 8000), IngressPath("/", "web", 8000))),)),
        egress=EgressSettings(policy="REGISTRY_ONLY", hosts=(
            EgressHostSpec("api.partner.example", 443, "tls", "240.240.0.1"),
            EgressHostSpec("legacy.partner.example", 80, "http", "240.240.0.2", "10.1.2.3",
                           EgressOrigination(443, "/etc/composemesh/egress/1/ca.pem")))),
        telemetry=Telemetry(access_log=False, tracing=TracingSettings(
            zipkin="http://collector:9411/api/v2/spans", sampling=0.25)),
    ),
)


def test_the_snapshot_on_the_wire_is_pinned() -> None:
    """A field renamed or retyped anywhere in a snapshot fails this (and the next) test.
    (After a deliberate change of the contract: write the new bytes to the golden file.)"""
    assert json.loads(encode_snapshot(SNAPSHOT)) == json.loads(GOLDEN.read_text())
    assert encode_snapshot(SNAPSHOT) == encode_snapshot(SNAPSHOT)  # deterministic: a version


def test_the_pinned_snapshot_decodes_to_the_same_values() -> None:
    assert decode_snapshot(GOLDEN.read_bytes()) == SNAPSHOT
    assert decode_snapshot(encode_snapshot(SNAPSHOT)) == SNAPSHOT


def test_the_other_messages_are_pinned() -> None:
    assert json.loads(encode(Ack("n", "v1", False, "why"))) == {
        "node": "n", "version": "v1", "ok": False, "reason": "why"}
    answer = CertificateResponse("C", "CH", "B", "spiffe://td/ns/p/sa/s", "2026-01-01T00:00:00",
                                 "1f")
    assert json.loads(encode(answer)) == {
        "cert_pem": "C", "chain_pem": "CH", "trust_bundle_pem": "B",
        "spiffe": "spiffe://td/ns/p/sa/s", "not_after": "2026-01-01T00:00:00", "serial": "1f"}
    assert decode(encode(answer), CertificateResponse) == answer
    assert json.loads(encode(ErrorResponse("no"))) == {"error": "no"}


def _golden() -> dict[str, Any]:
    wire: dict[str, Any] = json.loads(GOLDEN.read_text())
    return wire


def _settings(wire: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = wire["settings"]
    return settings


@pytest.mark.parametrize(("change", "reason"), [
    (lambda w: _settings(w)["routing"]["reviews"]["routes"][0]["destinations"][0].update(
        weight=1.5),
     "$.settings.routing.reviews.routes[0].destinations[0].weight: Expected `int`, got `float`"),
    (lambda w: _settings(w)["routing"]["reviews"]["routes"][0]["destinations"][0].update(
        weigth=_settings(w)["routing"]["reviews"]["routes"][0]["destinations"][0].pop("weight")),
     "$.settings.routing.reviews.routes[0].destinations[0]: Object missing required field "
     "`weight`"),
    (lambda w: _settings(w)["services"]["reviews"][1].update(node=""),
     "$.settings.services.reviews[1].node: Expected `str` of length >= 1"),
    (lambda w: _settings(w).update(mtls_mode="LAX"),
     "$.settings.mtls_mode: Invalid enum value 'LAX'"),
    (lambda w: _settings(w)["policies"]["reviews"][0].update(action="MAYBE"),
     "$.settings.policies.reviews[0].action: Invalid enum value 'MAYBE'"),
    (lambda w: _settings(w)["protocols"]["ratings"].update(ports={"0": "tcp"}),
     "$.settings.protocols.ratings.ports: Expected `str` matching regex"),
    (lambda w: w["identity"].pop("node"), "$.identity: Object missing required field `node`"),
    (lambda w: w.update(schema=2), "$.schema: unknown snapshot schema 2"),
])
def test_a_mistyped_or_renamed_field_is_nacked_with_its_path(change: Any, reason: str) -> None:
    wire = _golden()
    change(wire)
    body = json.dumps(wire).encode()
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(body)
    assert str(caught.value).startswith(reason), str(caught.value)
    answer = ConfigStore().offer(body)  # the proxy's side: the same words in the NACK
    assert not answer.ok and answer.reason == str(caught.value)


def test_a_key_msgspec_does_not_name_is_named() -> None:
    """The first bad entry of a mapping is named by its key, not ``[...]``."""
    wire = _golden()
    _settings(wire)["routing"]["details"] = _settings(wire)["routing"]["reviews"]
    _settings(wire)["routing"]["zz"] = {"service": "zz", "routes": [{"name": 3}]}
    with pytest.raises(ContractError, match=r"^\$\.settings\.routing\.zz\.routes\[0\]"):
        decode(json.dumps(wire), Snapshot)


def test_same_content_same_version() -> None:
    again = decode_snapshot(encode_snapshot(SNAPSHOT))
    assert content_version(again) == content_version(SNAPSHOT)
    assert content_version(SNAPSHOT.settings) != content_version(SnapshotSettings())
