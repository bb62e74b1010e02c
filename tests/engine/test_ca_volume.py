"""`composemesh certs import`'s Docker side (``engine.ca_volume``): what the short-lived
container does to the volume (``place_root``, run here on a directory in tmp_path that
stands for the mounted volume), that the pilot's CA then loads it as its stored root, what
the container is run with, and the refusals. The command on the real engine, with a real
`up` after it: tests/e2e/test_certs_export_import.py."""

from __future__ import annotations

import ast
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from composemesh import cli
from composemesh.ca import cert_to_pem, fingerprint, key_to_pem, make_root
from composemesh.engine import ca_volume
from composemesh.engine.ca_volume import VolumeRefused, place_root
from composemesh.inject.templates import PILOT_VOLUME, make_pilot
from composemesh.model.settings import MeshSettings
from composemesh.model.wellknown import MESH_IMAGE
from composemesh.pilot import ca_service
from composemesh.pilot.ca_service import CAService


def pem_pair(name: str = "a") -> tuple[str, str]:
    cert, key = make_root(f"composemesh root CA ({name})", "cluster.local")
    return cert_to_pem(cert).decode(), key_to_pem(key).decode()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- in the volume


def test_the_file_names_and_place_are_the_cas_and_the_injectors() -> None:
    assert (ca_volume.CA_DIR, ca_volume.ROOT_CERT, ca_volume.ROOT_KEY, ca_volume.ROOTS) == (
        ca_service.CA_DIR, ca_service.ROOT_CERT, ca_service.ROOT_KEY, ca_service.ROOTS)
    assert (ca_volume.DIR_MODE, ca_volume.KEY_MODE, ca_volume.PUBLIC_MODE) == (
        ca_service.DIR_MODE, ca_service.KEY_MODE, ca_service.PUBLIC_MODE)
    assert ca_volume.STATE_DIR == ca_service.DEFAULT_STATE_DIR
    pilot = make_pilot({}, None, MESH_IMAGE)
    mounts = {v["source"]: v["target"] for v in pilot["volumes"] if v["type"] == "volume"}
    assert mounts[PILOT_VOLUME] == ca_volume.STATE_DIR
    assert ca_volume.volume_name("hostb") == f"hostb_{PILOT_VOLUME}"


def test_a_written_root_is_what_the_pilot_loads_as_its_stored_root(tmp_path: Path) -> None:
    cert_pem, key_pem = pem_pair()
    assert place_root(str(tmp_path), cert_pem, key_pem) == {"result": "written"}
    ca_dir = tmp_path / "ca"
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root-key.pem") == 0o600
    assert mode(ca_dir / "root.pem") == 0o644
    assert sorted(p.name for p in ca_dir.iterdir()) == ["root-key.pem", "root.pem"]
    owner = (tmp_path.stat().st_uid, tmp_path.stat().st_gid)
    for path in (ca_dir, ca_dir / "root.pem", ca_dir / "root-key.pem"):
        assert (path.stat().st_uid, path.stat().st_gid) == owner

    # the pilot's start-up, as in the container: CAService.load_or_create's "stored" path
    ca = CAService.load_or_create(MeshSettings(), "hostb", tmp_path, {})
    assert ca.source == "stored"
    assert cert_to_pem(ca.root_cert).decode() == cert_pem
    assert key_to_pem(ca.authority.roots.active.key).decode() == key_pem
    assert ca.info()["fingerprint"] == fingerprint(ca.root_cert)


def test_the_same_root_again_changes_nothing(tmp_path: Path) -> None:
    cert_pem, key_pem = pem_pair()
    place_root(str(tmp_path), cert_pem, key_pem)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ca").iterdir()}
    assert place_root(str(tmp_path), cert_pem, key_pem) == {"result": "same"}
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ca").iterdir()}
    assert after == before


def test_a_volume_with_another_root_is_left_alone(tmp_path: Path) -> None:
    # the volume of a project that was up: its pilot generated a root and issued certificates
    old = CAService.load_or_create(MeshSettings(), "hostb", tmp_path, {})
    assert old.source == "generated"
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    cert_pem, key_pem = pem_pair("other")
    answer = place_root(str(tmp_path), cert_pem, key_pem)
    assert answer == {"result": "different", "cert_pem": cert_to_pem(old.root_cert).decode()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before


def test_after_a_rotation_the_root_that_signs_is_the_one_compared(tmp_path: Path) -> None:
    ca = CAService.load_or_create(MeshSettings(), "hostb", tmp_path, {})
    first = cert_to_pem(ca.root_cert).decode()
    first_key = key_to_pem(ca.authority.roots.active.key).decode()
    ca.rotate("begin")
    # a rotation under way: even the root that still signs is not settled there
    assert place_root(str(tmp_path), first, first_key)["result"] == "different"
    ca.rotate("switch")
    ca.rotate("finish")
    new = cert_to_pem(ca.root_cert).decode()
    new_key = key_to_pem(ca.authority.roots.active.key).decode()
    assert new != first and (tmp_path / "ca" / "roots.json").exists()
    assert place_root(str(tmp_path), first, first_key) == {"result": "different",
                                                           "cert_pem": new}
    assert place_root(str(tmp_path), new, new_key) == {"result": "same"}


def test_a_damaged_manifest_counts_as_another_root(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "roots.json").write_text("{not json")
    cert_pem, key_pem = pem_pair()
    assert place_root(str(tmp_path), cert_pem, key_pem) == {"result": "different",
                                                            "cert_pem": ""}
    assert not (tmp_path / "ca" / "root.pem").exists()


def test_a_lone_key_of_no_root_is_replaced(tmp_path: Path) -> None:
    """What load_or_create_root does too: a key without its certificate is no root."""
    (tmp_path / "ca").mkdir(mode=0o755)
    (tmp_path / "ca" / "root-key.pem").write_text("stale")
    cert_pem, key_pem = pem_pair()
    assert place_root(str(tmp_path), cert_pem, key_pem) == {"result": "written"}
    assert (tmp_path / "ca" / "root-key.pem").read_text() == key_pem
    assert mode(tmp_path / "ca") == 0o700


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_the_key_is_never_more_open_than_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              umask: int) -> None:
    seen: list[int] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("root-key.pem"):
            seen.append(mode(Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    old = os.umask(umask)
    try:
        place_root(str(tmp_path), *pem_pair())
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert mode(tmp_path / "ca" / "root-key.pem") == 0o600


def test_the_containers_program_imports_the_standard_library_only() -> None:
    """It runs in the mesh image by its text (python3 -c), whatever composemesh is there."""
    tree = ast.parse(Path(ca_volume.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    names.discard("__future__")
    assert names and names <= set(sys.stdlib_module_names), names


def test_the_containers_program_reads_stdin_and_answers_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    cert_pem, key_pem = pem_pair()
    monkeypatch.setattr(ca_volume, "STATE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"cert_pem": cert_pem,
                                                              "key_pem": key_pem})))
    assert ca_volume.main() == 0
    assert json.loads(capsys.readouterr().out) == {"result": "written"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("{}"))
    assert ca_volume.main() == 1
    assert "KeyError" in capsys.readouterr().err


# --------------------------------------------------------------------------- the container


def test_the_writer_has_no_network_few_capabilities_and_the_key_only_on_stdin() -> None:
    cert_pem, key_pem = pem_pair()
    cmd = ca_volume.writer_command("hostb_composemesh-pilot-state", MESH_IMAGE, "w1")
    joined = " ".join(cmd)
    assert cmd[:3] == ["run", "--rm", "-i"]
    assert "--network none" in joined and "--pull never" in joined
    assert "--cap-drop ALL" in joined and "--read-only" in joined
    assert "no-new-privileges" in joined and "--log-driver none" in joined
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--cap-add"] == [
        "CHOWN", "DAC_OVERRIDE", "FOWNER"]
    assert f"type=volume,source=hostb_composemesh-pilot-state,target={ca_volume.STATE_DIR}" \
        in cmd
    assert key_pem.splitlines()[1] not in joined and "-e" not in cmd and "--env" not in cmd
    assert cmd[cmd.index(MESH_IMAGE) + 1:cmd.index(MESH_IMAGE) + 2] == ["-c"]


class Engine:
    """Stands in for the docker CLI (``ca_volume._docker``), recording what is asked; the
    container's answer is ``place_root`` on a directory, as the real container's would be."""

    def __init__(self, state: Path, volume_exists: bool = False) -> None:
        self.state = state
        self.volumes: dict[str, list[str]] = {}
        self.exists = volume_exists
        self.calls: list[list[str]] = []

    def __call__(self, *args: str, stdin: str | None = None,
                 timeout: float = 60.0) -> tuple[int, str, str]:
        self.calls.append(list(args))
        if args[:2] == ("volume", "inspect"):
            return (0, "[]", "") if self.exists else (1, "", f"Error: No such volume: {args[2]}")
        if args[:2] == ("volume", "create"):
            self.exists = True
            self.volumes[args[-1]] = list(args)
            return 0, args[-1], ""
        if args[:2] == ("compose", "version"):
            return 0, "2.40.3\n", ""
        if args[0] == "run":
            given = json.loads(stdin or "{}")
            return 0, json.dumps(place_root(str(self.state), given["cert_pem"],
                                            given["key_pem"])) + "\n", ""
        raise AssertionError(args)


def test_import_creates_the_volume_with_composes_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(tmp_path)
    monkeypatch.setattr(ca_volume, "_docker", engine)
    monkeypatch.setattr(ca_volume, "pilot_running", lambda project: False)
    cert_pem, key_pem = pem_pair()
    done = ca_volume.import_root("hostb", cert_pem, key_pem)
    assert done == ca_volume.Imported("written", "hostb_composemesh-pilot-state", True)
    create = engine.volumes["hostb_composemesh-pilot-state"]
    labels = {create[i + 1] for i, a in enumerate(create) if a == "--label"}
    assert labels == {"com.docker.compose.project=hostb",
                      "com.docker.compose.volume=composemesh-pilot-state",
                      "com.docker.compose.version=2.40.3"}
    again = ca_volume.import_root("hostb", cert_pem, key_pem)
    assert again == ca_volume.Imported("same", "hostb_composemesh-pilot-state", False)


def test_import_refuses_while_the_pilot_runs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(tmp_path)
    monkeypatch.setattr(ca_volume, "_docker", engine)
    monkeypatch.setattr(ca_volume, "pilot_running", lambda project: True)
    with pytest.raises(VolumeRefused, match=r"the pilot of hostb is running .*`composemesh "
                       r"down` first .*`composemesh certs rotate-root`"):
        ca_volume.import_root("hostb", *pem_pair())
    assert engine.calls == []


def test_import_refuses_a_volume_with_another_root(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    old = CAService.load_or_create(MeshSettings(), "hostb", tmp_path, {})
    monkeypatch.setattr(ca_volume, "_docker", Engine(tmp_path, volume_exists=True))
    monkeypatch.setattr(ca_volume, "pilot_running", lambda project: False)
    with pytest.raises(VolumeRefused) as refused:
        ca_volume.import_root("hostb", *pem_pair("other"))
    assert str(refused.value) == (
        f"the CA volume hostb_composemesh-pilot-state of hostb already holds another root "
        f"({fingerprint(old.root_cert)}): `composemesh down -v` drops it, and with it every "
        "identity it signed; then import again")


# --------------------------------------------------------------------------- the command's checks


def write_pair(folder: Path, cert_pem: str, key_pem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "root.pem").write_text(cert_pem)
    (folder / "root-key.pem").write_text(key_pem)
    os.chmod(folder / "root-key.pem", 0o600)
    return folder


def import_cli(*args: str) -> Any:
    for console in (cli.out, cli.err):
        console.width = 300
    return CliRunner().invoke(cli.main, ["certs", "import", *args])


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command's checks come first: the engine is never asked when they fail."""
    asked: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        asked.append("engine")
        raise AssertionError("the engine was asked")

    monkeypatch.setattr(ca_volume, "import_root", refuse)
    monkeypatch.setattr(cli, "_mesh_image_present", lambda progress: asked.append("image"))
    return asked


def test_import_checks_the_pair_first(tmp_path: Path, no_engine: list[str]) -> None:
    cert_pem, key_pem = pem_pair()
    other_cert, other_key = pem_pair("other")
    cases = {
        "mismatch": ((other_cert, key_pem), "root-key.pem: the key does not match"),
        "not-pem": (("hello", key_pem), "root.pem: the file is not a PEM X.509 certificate"),
        "bad-key": ((cert_pem, "nope"), "root-key.pem: the file is not a PEM private key"),
    }
    for name, ((c, k), said) in cases.items():
        folder = write_pair(tmp_path / name, c, k)
        result = import_cli(str(folder), "-p", "hostb")
        assert result.exit_code == 1, result.output
        assert said in result.output
        assert result.output.count("\n") == 1, result.output
    missing = tmp_path / "missing"
    missing.mkdir()
    result = import_cli(str(missing), "-p", "hostb")
    assert result.exit_code == 1 and "cannot read" in result.output
    assert no_engine == []


def test_import_refuses_an_expired_or_non_ca_certificate(tmp_path: Path,
                                                         no_engine: list[str]) -> None:
    from datetime import UTC, datetime, timedelta

    from composemesh.ca import generate_key, make_csr, sign_workload, spiffe_id

    cert, key = make_root("old root", "cluster.local",
                          now=datetime.now(UTC) - timedelta(days=4000),
                          lifetime=timedelta(days=30))
    folder = write_pair(tmp_path / "expired", cert_to_pem(cert).decode(),
                        key_to_pem(key).decode())
    result = import_cli(str(folder), "-p", "hostb")
    assert result.exit_code == 1 and "root.pem: the certificate expired on" in result.output

    root, root_key = make_root("root", "cluster.local")
    leaf_key = generate_key()
    leaf = sign_workload(make_csr(leaf_key), root, root_key,
                         spiffe_id("cluster.local", "p", "web"))
    folder = write_pair(tmp_path / "leaf", cert_to_pem(leaf).decode(),
                        key_to_pem(leaf_key).decode())
    result = import_cli(str(folder), "-p", "hostb")
    assert result.exit_code == 1 and "root.pem: the certificate is not a CA" in result.output
    assert no_engine == []


def test_import_says_the_refusal_in_one_sentence(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(project: str, cert_pem: str, key_pem: str) -> Any:
        raise VolumeRefused(f"the pilot of {project} is running")

    monkeypatch.setattr(ca_volume, "import_root", refuse)
    monkeypatch.setattr(cli, "_mesh_image_present", lambda progress: None)
    folder = write_pair(tmp_path / "pair", *pem_pair())
    result = import_cli(str(folder), "-p", "hostb")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "error: the pilot of hostb is running"


def test_import_refuses_a_project_with_its_own_root(tmp_path: Path,
                                                    no_engine: list[str]) -> None:
    own_cert, own_key = pem_pair("own")
    write_pair(tmp_path / "own", own_cert, own_key)
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "x-composemesh:\n  mtls:\n    root: {cert: own/root.pem, key: own/root-key.pem}\n"
        "services:\n  web:\n    image: nginx\n")
    folder = write_pair(tmp_path / "pair", *pem_pair())
    result = import_cli(str(folder), "-f", str(compose), "-p", "hostb")
    assert result.exit_code == 1, result.output
    assert "brings its own root (x-composemesh.mtls.root)" in result.output
    assert no_engine == []
