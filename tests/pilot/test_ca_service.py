"""The pilot's CA: its root on the state volume, the user's root, attested issuance, the API."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from composemesh.ca import (
    IssuanceRefused,
    cert_from_pem,
    cert_to_pem,
    certs_from_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    key_to_pem,
    make_csr,
    make_root,
    spiffe_of,
    verify_chain,
)
from composemesh.errors import ConfigError
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings, parse_settings
from composemesh.model.snapshot import decode_snapshot
from composemesh.pilot.ca_service import (
    ENV_CA_CERT_FILE,
    ENV_CA_KEY_FILE,
    CAService,
    CAStateError,
)
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers

WEB = Workload(
    node="shop-web-netns-1",
    project="shop",
    compose_service="web-v1",
    service="web",
    version="v1",
    addresses=("10.9.0.2",),
    running=False,  # a proxy asks before its app is healthy: it still gets a certificate
    proxy_container="shop-web-v1-proxy-1",
    proxy_container_id="a" * 64,
)
DB = replace(WEB, node="shop-db-netns-1", compose_service="db", service="db",
             addresses=("10.9.0.9",), proxy_container_id="b" * 64)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def csr(spiffe: str | None = None) -> bytes:
    return csr_to_pem(make_csr(generate_key(), spiffe))


def service(tmp_path: Path, settings: MeshSettings | None = None,
            environ: dict[str, str] | None = None) -> CAService:
    return CAService.load_or_create(settings or MeshSettings(), "shop", tmp_path, environ or {})


# --------------------------------------------------------------------------- the root


def test_a_root_is_made_once_private_and_reloaded_on_restart(tmp_path: Path) -> None:
    first = service(tmp_path)
    ca_dir = tmp_path / "ca"
    assert first.source == "generated"
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root-key.pem") == 0o600
    assert mode(ca_dir / "root.pem") == 0o644
    assert b"PRIVATE KEY" in (ca_dir / "root-key.pem").read_bytes()
    assert sorted(p.name for p in ca_dir.iterdir()) == ["root-key.pem", "root.pem"]
    root = cert_from_pem((ca_dir / "root.pem").read_bytes())
    assert root == first.root_cert
    assert "shop" in root.subject.rfc4514_string()

    again = service(tmp_path)  # the pilot restarted: same volume, same root
    assert again.source == "stored"
    assert fingerprint(again.root_cert) == fingerprint(root)
    assert again.trust_bundle_pem == first.trust_bundle_pem


def test_a_stored_root_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    service(tmp_path)
    (tmp_path / "ca" / "root-key.pem").chmod(0o644)
    (tmp_path / "ca").chmod(0o755)
    service(tmp_path)
    assert mode(tmp_path / "ca" / "root-key.pem") == 0o600
    assert mode(tmp_path / "ca") == 0o700


def test_damaged_state_is_one_clear_error_and_a_lone_key_is_replaced(tmp_path: Path) -> None:
    fp = fingerprint(service(tmp_path).root_cert)
    (tmp_path / "ca" / "root-key.pem").unlink()
    with pytest.raises(CAStateError, match=r"root key .* is missing; remove the CA's volume"):
        service(tmp_path)
    (tmp_path / "ca" / "root.pem").unlink()
    (tmp_path / "ca" / "root-key.pem").write_bytes(b"junk")
    fresh = service(tmp_path)
    assert fresh.source == "generated" and fingerprint(fresh.root_cert) != fp
    other, _ = make_root("other", "cluster.local")
    (tmp_path / "ca" / "root.pem").write_bytes(cert_to_pem(other))  # not the key's cert
    with pytest.raises(CAStateError, match="does not match"):
        service(tmp_path)


def test_the_users_root_comes_from_the_files_the_env_names(tmp_path: Path) -> None:
    cert, key = make_root("acme root", "cluster.local")
    (tmp_path / "mine.pem").write_bytes(cert_to_pem(cert))
    (tmp_path / "mine-key.pem").write_bytes(key_to_pem(key))
    env = {ENV_CA_CERT_FILE: str(tmp_path / "mine.pem"),
           ENV_CA_KEY_FILE: str(tmp_path / "mine-key.pem")}
    ca = service(tmp_path / "state", environ=env)
    assert ca.source == "user" and ca.root_cert == cert
    assert not (tmp_path / "state" / "ca" / "root-key.pem").exists()  # nothing generated
    signed = ca.issue(csr(), WEB)
    verify_chain(cert_from_pem(signed.cert_pem), [], [cert])

    with pytest.raises(ConfigError, match=f"{ENV_CA_KEY_FILE} is not set") as info:
        service(tmp_path / "state", environ={ENV_CA_CERT_FILE: env[ENV_CA_CERT_FILE]})
    assert info.value.field == "x-composemesh.mtls.root"
    (tmp_path / "other-key.pem").write_bytes(key_to_pem(generate_key()))
    with pytest.raises(ConfigError, match="the key does not match") as info:
        service(tmp_path / "state",
                environ={**env, ENV_CA_KEY_FILE: str(tmp_path / "other-key.pem")})
    assert info.value.field == "x-composemesh.mtls.root.key"


def test_a_root_in_the_compose_file_that_did_not_reach_the_pilot_is_refused(
        tmp_path: Path) -> None:
    settings = parse_settings({"mtls": {"root": {"cert": "c.pem", "key": "k.pem"}}})
    with pytest.raises(ConfigError, match=f"did not reach the pilot.*{ENV_CA_CERT_FILE}"):
        service(tmp_path, settings)
    assert not (tmp_path / "ca" / "root.pem").exists()  # no silent root of our own


def test_the_workload_ttl_and_trust_domain_come_from_the_settings(tmp_path: Path) -> None:
    settings = parse_settings({"trust_domain": "example.org",
                               "mtls": {"workload_cert_ttl": "2m"}})
    ca = service(tmp_path, settings)
    cert = cert_from_pem(ca.issue(csr(), WEB).cert_pem)
    assert spiffe_of(cert) == "spiffe://example.org/ns/shop/sa/web"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=3)  # +skew
    assert ca.info()["workload_ttl_s"] == 120.0


# --------------------------------------------------------------------------- attestation


def test_attestation_names_the_callers_service_never_what_the_csr_asks(tmp_path: Path) -> None:
    ca = service(tmp_path)
    assert ca.attest(WEB).uri == "spiffe://cluster.local/ns/shop/sa/web"
    signed = ca.issue(csr(), WEB, "127.0.0.1")  # no SAN asked: the attested one given
    assert spiffe_of(cert_from_pem(signed.cert_pem)) == "spiffe://cluster.local/ns/shop/sa/web"
    same = ca.issue(csr("spiffe://cluster.local/ns/shop/sa/web"), WEB, "127.0.0.1")
    assert same.spiffe.uri == signed.spiffe.uri
    with pytest.raises(IssuanceRefused, match="asks for spiffe://cluster.local/ns/shop/sa/db"):
        ca.issue(csr("spiffe://cluster.local/ns/shop/sa/db"), WEB)
    with pytest.raises(IssuanceRefused, match="malformed"):
        ca.issue(b"not a csr", WEB)


def test_issued_certificates_are_recorded_and_survive_a_restart(tmp_path: Path) -> None:
    ca = service(tmp_path)
    signed = ca.issue(csr(), WEB, WEB.proxy_container_id or "")
    cert = cert_from_pem(signed.cert_pem)
    record = ca.record_for(WEB)
    assert record is not None
    assert record.spiffe == "spiffe://cluster.local/ns/shop/sa/web"
    assert record.serial == f"{cert.serial_number:x}"
    assert datetime.fromisoformat(record.not_after) == cert.not_valid_after_utc
    assert ca.record_for(DB) is None
    saved = (tmp_path / "ca" / "issued.json").read_text()
    assert "PRIVATE KEY" not in saved and "CERTIFICATE" not in saved

    again = service(tmp_path)
    assert again.record_for(WEB) == record
    assert again.record_for(WEB, record.serial) == record  # what the proxy says it holds
    assert again.record_for(WEB, "0123") is None
    moved = replace(WEB, proxy_container_id="c" * 64)  # a new proxy container, same name
    assert again.record_for(moved) is None


# --------------------------------------------------------------------------- the HTTP API


async def with_pilot(tmp_path: Path, body: Callable[[Pilot, TestClient], Awaitable[None]],
                     workloads: tuple[Workload, ...] = (WEB,), ca: bool = True) -> None:
    pilot = Pilot(MeshState(project="shop", workloads=workloads), None,
                  service(tmp_path) if ca else None, attestor=Callers(WEB.node))
    pilot.synced = True
    async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
        await body(pilot, client)


def run(tmp_path: Path, body: Callable[[Pilot, TestClient], Awaitable[None]], **kw: Any) -> None:
    asyncio.run(with_pilot(tmp_path, body, **kw))


def test_post_certificate_issues_for_the_attested_caller(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body(pilot: Pilot, client: TestClient) -> None:
        key = generate_key()
        resp = await client.post("/v1/certificate", data=csr_to_pem(make_csr(key)))
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert set(answer) == {"cert_pem", "chain_pem", "trust_bundle_pem", "spiffe",
                               "not_after", "serial"}
        cert = cert_from_pem(answer["cert_pem"])
        assert answer["spiffe"] == spiffe_of(cert) == "spiffe://cluster.local/ns/shop/sa/web"
        assert cert.public_key() == key.public_key()
        # the attested workload and version, in the subject: the peer's metrics name them
        assert cert.subject.rfc4514_string() == (
            f"CN={WEB.compose_service},OU={WEB.version},O=shop")
        chain = certs_from_pem(answer["chain_pem"])
        verify_chain(cert, chain[1:], certs_from_pem(answer["trust_bundle_pem"]))
        assert datetime.fromisoformat(answer["not_after"]) == cert.not_valid_after_utc

        pilot.attestor.host()
        status = await (await client.get("/v1/status")).json()
        row = status["proxies"][0]
        assert row["identity"] == answer["spiffe"]
        assert row["cert_serial"] == answer["serial"] == f"{cert.serial_number:x}"
        assert row["cert_not_after"] == answer["not_after"]
        assert row["cert_issuer_fingerprint"] == fingerprint(chain[1])
        # the snapshot carries the same (public) trust bundle; to the proxy, not the host
        assert (await client.get("/v1/snapshot")).status == 403
        assert (await client.post("/v1/certificate", data=csr())).status == 403
        pilot.attestor.proxy(WEB.node)
        resp = await client.get("/v1/snapshot")
        assert resp.status == 200
        snap = pilot.snapshot_for(WEB)
        assert snap.settings.trust_bundle == answer["trust_bundle_pem"]
        assert snap.settings.signing_root == fingerprint(chain[1])
        assert row["snapshot_version"] == snap.version  # status renders the same snapshot

    run(tmp_path, body)
    assert "certificate issued to proxy of shop-web-netns-1 (pid 4242)" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_refusals_are_403_and_logged_with_the_caller_and_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def body(pilot: Pilot, client: TestClient) -> None:
        other = csr("spiffe://cluster.local/ns/shop/sa/db")
        resp = await client.post("/v1/certificate", data=other)
        assert resp.status == 403
        assert "attested as spiffe://cluster.local/ns/shop/sa/web" in (await resp.json())["error"]
        resp = await client.post("/v1/certificate", data=b"x" * 20000)
        assert resp.status == 403 and "larger than" in (await resp.json())["error"]
        assert pilot.ca is not None and pilot.ca.record_for(WEB) is None  # nothing issued

        pilot.attestor.stranger()  # a container that is no proxy of the project
        resp = await client.post("/v1/certificate", data=csr())
        assert resp.status == 503
        assert "is no proxy of project 'shop'" in (await resp.json())["error"]
        pilot.attestor.host()  # the host's user is no workload: no certificate either
        resp = await client.post("/v1/certificate", data=csr())
        assert resp.status == 403 and "not for the host" in (await resp.json())["error"]
        assert pilot.ca.record_for(WEB) is None

    run(tmp_path, body)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 4
    assert all(line.startswith("certificate refused to proxy of shop-web-netns-1")
               for line in lines[:2])
    assert "asks for spiffe://cluster.local/ns/shop/sa/db" in lines[0]
    assert "an unattested caller refused: container" in lines[2]
    assert "from host (pid 4242) refused" in lines[3]
    assert "PRIVATE KEY" not in caplog.text and "CERTIFICATE REQUEST" not in caplog.text


def test_an_unknown_caller_before_the_first_sync_is_told_to_come_back(tmp_path: Path) -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        pilot.synced = False
        assert (await client.post("/v1/certificate", data=csr())).status == 503
        pilot.attestor.stranger()
        assert (await client.post("/v1/certificate", data=csr())).status == 503

    run(tmp_path, body, workloads=())


def test_get_ca_shows_the_root_and_bundle_and_a_pilot_without_a_ca_says_404(
        tmp_path: Path) -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        info = await (await client.get("/v1/ca")).json()
        assert pilot.ca is not None
        root = pilot.ca.root_cert
        assert info["fingerprint"] == fingerprint(root)
        assert info["subject"] == root.subject.rfc4514_string()
        assert datetime.fromisoformat(info["not_after"]) == root.not_valid_after_utc
        assert datetime.fromisoformat(info["not_before"]) == root.not_valid_before_utc
        assert certs_from_pem(info["trust_bundle_pem"]) == [root]
        assert (info["source"], info["trust_domain"]) == ("generated", "cluster.local")
        assert "PRIVATE KEY" not in json.dumps(info)

    run(tmp_path, body)

    async def no_ca(pilot: Pilot, client: TestClient) -> None:
        assert (await client.get("/v1/ca")).status == 404
        assert (await client.post("/v1/certificate", data=csr())).status == 404
        pilot.attestor.host()
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert (row["identity"], row["cert_not_after"], row["cert_serial"]) == (None, None, None)
        pilot.attestor.proxy(WEB.node)
        snap = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        assert snap.settings.trust_bundle == snap.settings.signing_root == ""

    run(tmp_path, no_ca, ca=False)



def test_expired_records_are_forgotten_by_the_clock(tmp_path: Path) -> None:
    now = [datetime.now(UTC)]
    ca = CAService.load_or_create(MeshSettings(), "shop", tmp_path, {}, clock=lambda: now[0])
    ca.issue(csr(), WEB, WEB.proxy_container_id or "")
    now[0] += timedelta(days=2)  # past the 24 h certificate (the root lives ten years)
    again = CAService.load_or_create(MeshSettings(), "shop", tmp_path, {}, clock=lambda: now[0])
    assert again.record_for(WEB) is None
