"""`POST /v1/ca/rotate`: the steps of a root rotation, refusals, and a pilot restart mid-way.

Who calls is said by ``tests/pilot/callers.Callers``: the host, unless a test says otherwise
(attestation itself: test_attest.py)."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from composemesh.ca import (
    RotationError,
    cert_to_pem,
    certs_from_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    key_to_pem,
    make_csr,
    make_root,
)
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings, parse_settings
from composemesh.pilot import ca_service
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
    compose_service="web",
    service="web",
    version="v1",
    addresses=("10.9.0.2",),
    running=True,
    proxy_container="shop-web-proxy-1",
    proxy_container_id="a" * 64,
)


def load(tmp_path: Path) -> CAService:
    return CAService.load_or_create(MeshSettings(), "shop", tmp_path, {})


def csr() -> bytes:
    return csr_to_pem(make_csr(generate_key()))


def run(body: Callable[[Pilot, TestClient], Awaitable[None]], ca: CAService | None,
        workloads: tuple[Workload, ...] = (WEB,)) -> None:
    async def main() -> None:
        pilot = Pilot(MeshState(project="shop", workloads=workloads), None, ca,
                      attestor=Callers().host())
        pilot.synced = True
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await body(pilot, client)

    asyncio.run(main())


async def rotate(client: TestClient, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/ca/rotate", json=body)
    answer: dict[str, Any] = await resp.json()
    return resp.status, answer


def test_the_three_steps_change_the_bundle_then_the_signer_then_drop_the_old_root(
        tmp_path: Path) -> None:
    ca = load(tmp_path)
    old_fp = fingerprint(ca.root_cert)

    async def body(pilot: Pilot, client: TestClient) -> None:
        versions = [pilot.snapshot_for(WEB).version]
        generation = pilot.generation

        status, info = await rotate(client, {"step": "begin"})
        assert status == 200, info
        assert (info["step"], info["rotation_phase"], info["fingerprint"]) == (
            "begin", "trusting", old_fp)
        assert info["generation"] == generation + 1 == pilot.generation  # pushed
        new_fp = info["trusted"][1]["fingerprint"]
        assert [t["fingerprint"] for t in info["trusted"]] == [old_fp, new_fp]
        assert info["trusted"][1]["subject"] == info["subject"]  # the same subject style
        snap = pilot.snapshot_for(WEB)
        assert [fingerprint(c) for c in certs_from_pem(snap.settings.trust_bundle)] == [
            old_fp, new_fp]
        assert snap.settings.signing_root == old_fp
        versions.append(snap.version)
        assert info == {**(await (await client.get("/v1/ca")).json()), "step": "begin",
                        "generation": pilot.generation}

        status, info = await rotate(client, {"step": "switch"})
        assert status == 200 and info["rotation_phase"] == "switched"
        assert info["fingerprint"] == new_fp
        assert [t["fingerprint"] for t in info["trusted"]] == [old_fp, new_fp]
        snap = pilot.snapshot_for(WEB)
        assert snap.settings.signing_root == new_fp
        versions.append(snap.version)
        pilot.ca.issue(csr(), WEB, WEB.proxy_container_id or "")  # type: ignore[union-attr]
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert row["cert_issuer_fingerprint"] == new_fp

        status, info = await rotate(client, {"step": "finish"})
        assert status == 200 and info["rotation_phase"] == "steady"
        assert [t["fingerprint"] for t in info["trusted"]] == [new_fp]
        snap = pilot.snapshot_for(WEB)
        assert [fingerprint(c) for c in certs_from_pem(snap.settings.trust_bundle)] == [new_fp]
        versions.append(snap.version)
        assert len(set(versions)) == 4  # every step is a new snapshot for every proxy

    run(body, ca)


def test_refusals(tmp_path: Path) -> None:
    ca = load(tmp_path)

    async def body(pilot: Pilot, client: TestClient) -> None:
        for step in ("switch", "finish"):
            status, answer = await rotate(client, {"step": step})
            assert status == 409, answer
            assert "begin the rotation first" in answer["error"] or "switch signing first" in \
                answer["error"]
        assert (await rotate(client, {"step": "begin"}))[0] == 200
        status, answer = await rotate(client, {"step": "begin"})
        assert (status, answer) == (409, {
            "error": "a rotation is already under way (phase trusting)"})
        assert (await rotate(client, {"step": "finish"}))[0] == 409
        status, answer = await rotate(client, {"step": "later"})
        assert status == 400 and "the steps are begin, switch, finish" in answer["error"]
        for bad in ([], {"stop": "begin"}):
            status, answer = await rotate(client, bad)
            assert status == 400 and answer["error"].startswith("malformed request")
        resp = await client.post("/v1/ca/rotate", data=b"{not json")
        assert resp.status == 400
        assert ca.authority.roots.phase == "trusting"  # nothing refused changed anything
        assert len(list(tmp_path.glob("ca/root-*-key.pem"))) == 1  # no root made for nothing

        generation = pilot.generation
        callers = pilot.attestor
        assert isinstance(callers, Callers)
        callers.proxy(WEB.node)  # a proxy (or whoever took its place) may not steer
        status, answer = await rotate(client, {"step": "switch"})
        assert (status, answer) == (403, {"error": "a root rotation is not for the proxy"})
        callers.stranger()  # a container that is no proxy of the project
        status, answer = await rotate(client, {"step": "switch"})
        assert status == 503 and "is no proxy of project 'shop'" in answer["error"]
        assert ca.authority.roots.phase == "trusting" and pilot.generation == generation
        callers.pilot()  # `docker exec` into the pilot's own container: the host's
        assert (await rotate(client, {"step": "switch"}))[0] == 200
        assert ca.authority.roots.phase == "switched" and pilot.generation == generation + 1

    run(body, ca)

    async def no_ca(pilot: Pilot, client: TestClient) -> None:
        assert (await rotate(client, {"step": "begin"}))[0] == 404

    run(no_ca, None)


def test_the_users_own_root_is_not_rotated_by_the_pilot(tmp_path: Path) -> None:
    cert, key = make_root("acme root", "cluster.local")
    (tmp_path / "root.pem").write_bytes(cert_to_pem(cert))
    (tmp_path / "root-key.pem").write_bytes(key_to_pem(key))
    settings = parse_settings({"mtls": {"root": {"cert": "x", "key": "y"}}})
    ca = CAService.load_or_create(settings, "shop", tmp_path / "state", {
        ENV_CA_CERT_FILE: str(tmp_path / "root.pem"),
        ENV_CA_KEY_FILE: str(tmp_path / "root-key.pem"),
    })
    assert ca.source == "user"

    async def body(pilot: Pilot, client: TestClient) -> None:
        status, answer = await rotate(client, {"step": "begin"})
        assert status == 409
        assert answer["error"].startswith("the root is the user's own (x-composemesh.mtls.root)")

    run(body, ca)
    assert ca.authority.roots.phase == "steady" and ca.root_cert == cert


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_restarted_pilot_resumes_the_rotation_where_it_was(tmp_path: Path) -> None:
    ca = load(tmp_path)
    old = ca.root_cert
    directory = tmp_path / "ca"

    ca.rotate("begin")
    new = ca.authority.roots.trusted[1]
    again = load(tmp_path)
    assert again.source == "stored"
    assert again.authority.roots.phase == "trusting"
    assert again.root_cert == old and again.authority.roots.trusted == (old, new)
    assert again.trust_bundle_pem == ca.trust_bundle_pem
    keys = sorted(directory.glob("*key.pem"))
    assert len(keys) == 2 and all(mode(k) == 0o600 for k in keys)
    assert mode(directory) == 0o700
    manifest = json.loads((directory / "roots.json").read_text())
    assert manifest["phase"] == "trusting" and manifest["active"] == "root"

    again.rotate("switch")
    third = load(tmp_path)
    assert third.authority.roots.phase == "switched"
    assert third.root_cert == new and third.authority.roots.trusted == (old, new)
    assert not (directory / "root-key.pem").exists()  # the old key signs no more: gone
    assert (directory / "root.pem").exists()  # its certificate is still trusted

    third.rotate("finish")
    fourth = load(tmp_path)
    assert fourth.authority.roots.phase == "steady"
    assert fourth.root_cert == new and fourth.authority.roots.trusted == (new,)
    stem = f"root-{fourth.info()['serial'][:16]}"
    assert sorted(p.name for p in directory.glob("*.pem")) == [f"{stem}-key.pem", f"{stem}.pem"]

    fourth.rotate("begin")  # a second rotation from the rotated root
    assert load(tmp_path).authority.roots.trusted[0] == new


def test_damaged_rotation_state_is_one_clear_error(tmp_path: Path) -> None:
    ca = load(tmp_path)
    ca.rotate("begin")
    incoming = ca.authority.roots.incoming
    assert incoming is not None
    for key_file in (tmp_path / "ca").glob("root-*-key.pem"):
        key_file.unlink()
    with pytest.raises(CAStateError, match="root key .* is missing"):
        load(tmp_path)
    (tmp_path / "ca" / "roots.json").write_text("{")
    with pytest.raises(CAStateError, match="roots.json cannot be read"):
        load(tmp_path)


def test_a_rotation_that_cannot_be_stored_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = load(tmp_path)
    before = ca.authority.roots

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ca_service, "_write_public", full_disk)
    with pytest.raises(OSError):
        ca.rotate("begin")
    assert ca.authority.roots is before
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["root-key.pem", "root.pem"]
    with pytest.raises(RotationError):
        ca.rotate("switch")
