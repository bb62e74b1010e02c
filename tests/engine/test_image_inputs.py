"""Pure tests of images.py's decisions (which images a project needs), of the wheelhouse's
target (wheel platforms, base facts), and that the package ships its data. No engine.

The content hash, the requirements, the wheel, the cache sweep and the base image have their
own test files (test_image_tags, test_requirements, test_wheel, test_image_cache,
test_base_image)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from composemesh.engine import images
from composemesh.engine.images import ensure_images, images_needed, wheel_platforms
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE

REPO = Path(__file__).resolve().parents[2]


def test_wheel_platforms_x86_64() -> None:
    tags = wheel_platforms("x86_64", (2, 36))
    assert tags[0] == "manylinux_2_36_x86_64"
    for tag in (
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
        "manylinux_2_5_x86_64",
    ):
        assert tag in tags
    assert "manylinux_2_37_x86_64" not in tags


def test_wheel_platforms_aarch64() -> None:
    tags = wheel_platforms("aarch64", (2, 31))
    assert tags[0] == "manylinux_2_31_aarch64"
    assert "manylinux2014_aarch64" in tags
    assert "manylinux_2_17_aarch64" in tags
    assert not [t for t in tags if t.startswith("manylinux1") or "_2_16_" in t]
    assert wheel_platforms("arm64", (2, 31)) == tags


def test_wheel_platforms_refuses_a_strange_glibc() -> None:
    with pytest.raises(ImageBuildError):
        wheel_platforms("x86_64", (3, 0))


def test_base_facts_decide_whether_the_build_needs_a_network() -> None:
    facts = images.BaseFacts("3.11", "x86_64", "glibc", (2, 36), frozenset({"iptables"}))
    assert not facts.self_contained
    full = images.BaseFacts(
        "3.11", "x86_64", "glibc", (2, 36), frozenset({"iptables", "useradd", "groupadd"})
    )
    assert full.self_contained
    assert full.abi == "cp311"


# --- which images a project needs -----------------------------------------------------------


def test_a_project_without_the_demo_needs_the_mesh_image_only() -> None:
    model = {"services": {"web": {"image": "nginx:1.27"}, "db": {"build": {"context": "."}}}}
    assert images_needed(model) == (MESH_IMAGE,)
    assert images_needed({}) == (MESH_IMAGE,)
    assert images_needed({"services": None}) == (MESH_IMAGE,)


@pytest.mark.parametrize("ref", [DEMO_IMAGE, f"docker.io/library/{DEMO_IMAGE}", f" {DEMO_IMAGE}"])
def test_a_service_on_the_demo_image_needs_it_too(ref: str) -> None:
    model = {"services": {"web": {"image": "nginx"}, "ratings": {"image": ref}}}
    assert images_needed(model) == (MESH_IMAGE, DEMO_IMAGE)


def test_another_tag_of_the_demo_is_not_ours_to_build() -> None:
    name = DEMO_IMAGE.split(":")[0]
    assert images_needed({"services": {"a": {"image": f"{name}:other"}}}) == (MESH_IMAGE,)
    assert images_needed({"services": {"a": {"image": f"reg.example/{DEMO_IMAGE}"}}}) == (
        MESH_IMAGE,
    )


def test_ensure_images_refuses_an_image_that_is_not_ours() -> None:
    with pytest.raises(ValueError, match="not an image of composemesh: nginx"):
        ensure_images(client=None, images=["nginx"])


def test_the_wheel_carries_every_file_the_package_needs() -> None:
    """Every file of the package that is not Python is package data (the Dockerfiles the
    mesh image builds from, py.typed): an installed composemesh has nothing else."""
    import fnmatch

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["composemesh"]
    package = REPO / "composemesh"
    data = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    ]
    assert "engine/dockerfiles/mesh.Dockerfile" in data
    assert [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
