"""The Prometheus image's inputs: which Debian packages apt says to fetch, what is hashed, the
on-disk cache, apt's failures as one sentence; and (e2e) the image built on the real engine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from composemesh.engine import prometheus_image as pi
from composemesh.engine.images import content_hash, ensure_images, images_needed
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE, PROMETHEUS_IMAGE

SIMULATION = """\
NOTE: This is only a simulation!
Reading package lists...
The following NEW packages will be installed:
  libjs-jquery prometheus
Inst libjs-jquery (3.6.1+dfsg+~3.5.14-1 Debian:12.15/oldstable [all])
Inst tzdata [2024a-0+deb12u1] (2026b-0+deb12u1 Debian:12.15/oldstable [all])
Inst prometheus (2.42.0+ds-5+deb12u1 Debian:12.15/oldstable [amd64])
Conf libjs-jquery (3.6.1+dfsg+~3.5.14-1 Debian:12.15/oldstable [all])
Conf prometheus (2.42.0+ds-5+deb12u1 Debian:12.15/oldstable [amd64])
"""


def test_the_install_plan_is_every_inst_line_with_its_new_version() -> None:
    assert pi.install_plan(SIMULATION.splitlines()) == [
        ("libjs-jquery", "3.6.1+dfsg+~3.5.14-1"),
        ("tzdata", "2026b-0+deb12u1"),  # an upgrade: the new version, not the old
        ("prometheus", "2.42.0+ds-5+deb12u1"),
    ]
    assert pi.install_plan(["E: Unable to locate package prometheus"]) == []


def test_the_deb_apt_wrote_is_found_with_or_without_an_epoch() -> None:
    files = {"prometheus_2.42.0+ds-5+deb12u1_amd64.deb", "libfoo_1%3a2.0-1_all.deb"}
    assert pi._deb_file(files, "prometheus", "2.42.0+ds-5+deb12u1") == \
        "prometheus_2.42.0+ds-5+deb12u1_amd64.deb"
    assert pi._deb_file(files, "libfoo", "1:2.0-1") == "libfoo_1%3a2.0-1_all.deb"
    assert pi._deb_file(files, "libbar", "1.0") is None


def debs_dir(tmp: Path, *names: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for name in names:
        (tmp / name).write_bytes(f"deb of {name}".encode())
    return tmp


def test_the_hash_covers_every_deb_the_dockerfile_and_the_base(tmp_path: Path) -> None:
    debs = debs_dir(tmp_path / "a", "prometheus_2.42_amd64.deb", "libjs-jquery_3.6_all.deb")
    files, extra = pi.prometheus_inputs(debs, base_id="sha256:aaa")
    assert set(files) == {"debs/prometheus_2.42_amd64.deb", "debs/libjs-jquery_3.6_all.deb",
                          "dockerfile/prometheus"}
    assert files["dockerfile/prometheus"] == pi.PROMETHEUS_DOCKERFILE
    assert pi.PROMETHEUS_DOCKERFILE.is_file()
    first = content_hash(files, extra)
    # the same debs elsewhere hash the same
    other = debs_dir(tmp_path / "b", "prometheus_2.42_amd64.deb", "libjs-jquery_3.6_all.deb")
    assert content_hash(*pi.prometheus_inputs(other, base_id="sha256:aaa")) == first
    assert content_hash(*pi.prometheus_inputs(debs, base_id="sha256:bbb")) != first
    (debs / "libjs-jquery_3.6_all.deb").write_bytes(b"another build")
    assert content_hash(*pi.prometheus_inputs(debs, base_id="sha256:aaa")) != first


def test_the_dockerfile_installs_offline_and_runs_prometheus_unprivileged() -> None:
    text = pi.PROMETHEUS_DOCKERFILE.read_text()
    assert "dpkg --install" in text and "apt-get" not in text
    assert "USER prometheus" in text
    assert 'ENTRYPOINT ["/usr/bin/prometheus"]' in text
    assert 'VOLUME ["/prometheus"]' in text


def test_a_complete_cached_download_is_used_without_apt_or_the_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no apt-get, no docker
    target = tmp_path / "composemesh" / "debs" / "prometheus-sha256-abc"
    debs_dir(target, "prometheus_2.42_amd64.deb")
    (target / pi.MANIFEST).write_text("prometheus=2.42 prometheus_2.42_amd64.deb\n")
    said: list[tuple[str, str]] = []
    assert pi.ensure_debs(None, "base", "sha256:abc", lambda s, d: said.append((s, d))) == target
    assert said and said[0][0] == "debs" and "cached" in said[0][1]


def test_a_download_missing_a_file_is_not_complete(tmp_path: Path) -> None:
    target = debs_dir(tmp_path / "d", "prometheus_2.42_amd64.deb")
    assert not pi._complete(target)  # no manifest: an interrupted download
    (target / pi.MANIFEST).write_text("prometheus=2.42 prometheus_2.42_amd64.deb\n"
                                      "libjs-jquery=3.6 libjs-jquery_3.6_all.deb\n")
    assert not pi._complete(target)
    debs_dir(target, "libjs-jquery_3.6_all.deb")
    assert pi._complete(target)


def test_no_apt_on_the_host_is_one_sentence(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageBuildError) as info:
        pi._resolve(tmp_path / "status", lambda s, d: None)
    text = str(info.value)
    assert text.startswith(f"{PROMETHEUS_IMAGE}: apt on this host cannot get Debian's "
                           "prometheus package")
    assert "apt-get is not installed on this host" in text and "\n" not in text


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (a Debian host)")
def test_a_package_apt_does_not_know_is_one_sentence_with_apts_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the host's real apt-get, simulating only (no download, no network)."""
    monkeypatch.setattr(pi, "PACKAGE", "composemesh-no-such-package")
    status = tmp_path / "status"
    status.write_text("")
    with pytest.raises(ImageBuildError) as info:
        pi._resolve(status, lambda s, d: None)
    assert "Unable to locate package composemesh-no-such-package" in str(info.value)
    assert "apt-get update" in str(info.value)


def test_a_model_with_the_prometheus_service_needs_its_image() -> None:
    model: dict[str, Any] = {"services": {
        "web": {"image": DEMO_IMAGE},
        "composemesh-prometheus": {"image": PROMETHEUS_IMAGE},
    }}
    assert images_needed(model) == (MESH_IMAGE, DEMO_IMAGE, PROMETHEUS_IMAGE)
    del model["services"]["web"]
    assert images_needed(model) == (MESH_IMAGE, PROMETHEUS_IMAGE)
    assert PROMETHEUS_IMAGE not in images_needed({"services": {"p": {"image": "prom/prom"}}})


@pytest.mark.e2e
def test_the_image_builds_offline_and_runs_prometheus() -> None:
    """The real engine: built (or found up to date), then `prometheus --version` in it with
    no network, as the unprivileged user."""
    import docker

    client = docker.from_env(timeout=900)
    built = ensure_images(client, images=(PROMETHEUS_IMAGE,))
    assert set(built) == {PROMETHEUS_IMAGE}
    again: list[tuple[str, str]] = []
    ensure_images(client, images=(PROMETHEUS_IMAGE,), progress=lambda s, d: again.append((s, d)))
    assert ("cached" in {s for s, _ in again}) and "built" not in {s for s, _ in again}
    run = subprocess.run(["docker", "run", "--rm", "--network", "none", PROMETHEUS_IMAGE,
                          "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "prometheus, version 2." in run.stdout + run.stderr
    user = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "id",
                           PROMETHEUS_IMAGE, "-un"], capture_output=True, text=True, timeout=120)
    assert user.stdout.strip() == "prometheus"
