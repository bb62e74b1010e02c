"""Pure tests of what goes into the images: content hashes, dependency pins, wheel platforms,
and the slimming of the debootstrap rootfs. No engine, no network."""

from __future__ import annotations

import importlib.metadata
import shutil
import tomllib
from pathlib import Path

import pytest

from composemesh.engine import base_image, images
from composemesh.engine.images import (
    SourceTree,
    content_hash,
    demo_inputs,
    dependency_lock,
    ensure_images,
    images_needed,
    locate_sources,
    mesh_inputs,
    normalized_requirement,
    runtime_requirements,
    wheel_platforms,
)
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE

REPO = Path(__file__).resolve().parents[2]


def make_tree(root: Path) -> SourceTree:
    """A small composemesh-like source tree: a package with a submodule and package data."""
    pkg = root / "composemesh"
    (pkg / "engine" / "dockerfiles").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "images.py").write_text("X = 1\n")
    (pkg / "engine" / "dockerfiles" / "mesh.Dockerfile").write_text("FROM scratch\n")
    (root / "pyproject.toml").write_text('[project]\nname = "composemesh"\ndependencies = []\n')
    return SourceTree(package_dir=pkg, project_root=root)


def mesh_hash(tree: SourceTree, base_id: str = "sha256:base", lock: tuple[str, ...] = ()) -> str:
    files, extra = mesh_inputs(tree, base_id=base_id, requirements=["click>=8.1"], lock=lock)
    return content_hash(files, extra)


def test_hash_is_stable_when_nothing_changes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    assert mesh_hash(tree) == mesh_hash(tree)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: (t.package_dir / "engine" / "images.py").write_text("X = 2\n"),
        lambda t: (t.package_dir / "new_module.py").write_text(""),
        lambda t: (t.package_dir / "engine" / "dockerfiles" / "mesh.Dockerfile").write_text("x"),
        lambda t: (t.project_root / "pyproject.toml").write_text("[project]\n"),
        lambda t: (t.package_dir / "engine" / "images.py").unlink(),
        lambda t: (t.package_dir / "engine" / "images.py").chmod(0o755),
    ],
    ids=["edit", "add", "package-data", "pyproject", "delete", "mode"],
)
def test_hash_changes_when_a_source_changes(tmp_path: Path, change) -> None:
    tree = make_tree(tmp_path)
    before = mesh_hash(tree)
    change(tree)
    assert mesh_hash(tree) != before


def test_hash_ignores_bytecode_caches_and_hidden_files(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    before = mesh_hash(tree)
    cache = tree.package_dir / "engine" / "__pycache__"
    cache.mkdir()
    (cache / "images.cpython-311.pyc").write_bytes(b"\0" * 10)
    (tree.package_dir / "stray.pyc").write_bytes(b"\0")
    (tree.package_dir / ".images.py.swp").write_text("editor")
    (tree.package_dir / ".mypy_cache").mkdir()
    (tree.package_dir / ".mypy_cache" / "x.json").write_text("{}")
    assert mesh_hash(tree) == before


def test_hash_changes_with_base_image_and_dependency_pins(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    before = mesh_hash(tree)
    assert mesh_hash(tree, base_id="sha256:other") != before
    assert mesh_hash(tree, lock=("aiohttp==3.9.0",)) != before
    assert mesh_hash(tree, lock=("aiohttp==3.9.0",)) != mesh_hash(tree, lock=("aiohttp==3.9.1",))


def test_hash_does_not_depend_on_where_the_tree_is(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    two = SourceTree(package_dir=tmp_path / "two" / "composemesh", project_root=tmp_path / "two")
    assert mesh_hash(one) == mesh_hash(two)


def test_content_hash_separates_names_from_contents(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("ab")
    (tmp_path / "b").write_text("")
    one = content_hash({"x": tmp_path / "a", "y": tmp_path / "b"})
    two = content_hash({"x": tmp_path / "b", "y": tmp_path / "a"})
    assert one != two
    assert content_hash({}, {"k": "v1"}) != content_hash({}, {"k": "v2"})
    assert content_hash({}, {"k": "v"}) != content_hash({}, {"kv": ""})


def test_demo_hash_follows_the_apps(tmp_path: Path) -> None:
    apps = tmp_path / "apps"
    apps.mkdir()
    (apps / "demo.py").write_text("print('v1')\n")

    def demo_hash(base_id: str = "sha256:base") -> str:
        return content_hash(*demo_inputs(apps, base_id=base_id))

    before = demo_hash()
    assert demo_hash() == before
    (apps / "__pycache__").mkdir()
    (apps / "__pycache__" / "demo.cpython-311.pyc").write_bytes(b"\0")
    assert demo_hash() == before
    assert demo_hash("sha256:other") != before
    (apps / "demo.py").write_text("print('v2')\n")
    assert demo_hash() != before


def test_the_real_tree_is_found_and_hashes_stably() -> None:
    tree = locate_sources()
    assert tree.project_root == REPO
    assert tree.package_dir == REPO / "composemesh"
    assert tree.apps_dir == REPO / "examples" / "apps"
    files, _ = mesh_inputs(tree, base_id="b", requirements=[], lock=[])
    assert "pkg/engine/images.py" in files
    assert "pkg/engine/dockerfiles/mesh.Dockerfile" in files
    assert "project/pyproject.toml" in files
    assert not [name for name in files if name.endswith(".pyc") or "__pycache__" in name]
    assert content_hash(files) == content_hash(dict(files))


def test_runtime_requirements_are_pyprojects_without_extras() -> None:
    tree = locate_sources()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert runtime_requirements(tree) == sorted(declared)
    assert not [r for r in runtime_requirements(tree) if r.startswith("pytest")]


def test_requirements_read_the_same_from_pyproject_and_from_a_wheels_metadata() -> None:
    # setuptools writes a wheel's Requires-Dist with double-quoted markers: the wheelhouse
    # and the image hash key on these strings, so an installed composemesh must find what the
    # same version from its source tree cached (and not download it all again).
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:
        assert normalized_requirement(requirement) == requirement  # already in the one form
        as_metadata = requirement.replace("'", '"')
        assert normalized_requirement(as_metadata) == requirement


@pytest.mark.parametrize(
    ("written", "normal"),
    [
        ("PyYAML>=6.0", "pyyaml>=6.0"),
        ("prometheus_client >= 0.20", "prometheus-client>=0.20"),
        ('uvloop >= 0.19 ; sys_platform!="win32"', "uvloop>=0.19; sys_platform != 'win32'"),
        ("requests[socks,security] >=2, <3", "requests[security,socks]<3,>=2"),
        ("foo (>=1.0,<2)", "foo<2,>=1.0"),
        (
            'foo; python_version < "3.12" and (os_name == "posix" or extra == "x")',
            "foo; python_version < '3.12' and (os_name == 'posix' or extra == 'x')",
        ),
        ("pkg @ https://h/p.whl ; os_name=='nt'", "pkg @ https://h/p.whl; os_name == 'nt'"),
        ('x; platform_release == "it\'s"', 'x; platform_release == "it\'s"'),
    ],
)
def test_normalized_requirement(written: str, normal: str) -> None:
    assert normalized_requirement(written) == normal
    assert normalized_requirement(normal) == normal


def test_dependency_lock_pins_what_is_installed_here() -> None:
    tree = locate_sources()
    lock = dependency_lock(runtime_requirements(tree))
    pins = dict(line.split("==", 1) for line in lock)
    assert pins["aiohttp"] == importlib.metadata.version("aiohttp")
    assert pins["cryptography"] == importlib.metadata.version("cryptography")
    # transitive dependencies are pinned too
    assert pins["yarl"] == importlib.metadata.version("yarl")
    assert "composemesh" not in pins
    assert "pytest" not in pins  # only an extra of composemesh, not a runtime dependency
    assert lock == sorted(lock)


def test_dependency_lock_skips_extras_and_missing_packages() -> None:
    lock = dependency_lock(
        ['pytest>=8; extra == "test"', "surely-not-installed-package>=1", "click>=8"]
    )
    names = [line.split("==")[0] for line in lock]
    assert "click" in names
    assert "pytest" not in names
    assert "surely-not-installed-package" not in names


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


# --- base_image, pure parts -----------------------------------------------------------------


def test_configured_base_image_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(base_image.BASE_IMAGE_ENV, raising=False)
    assert base_image.configured_base_image() == "python:3.11-slim-bookworm"
    assert base_image.configured_base_image("debian:12") == "debian:12"
    monkeypatch.setenv(base_image.BASE_IMAGE_ENV, "registry.local/python:3.11")
    assert base_image.configured_base_image("debian:12") == "registry.local/python:3.11"
    monkeypatch.setenv(base_image.BASE_IMAGE_ENV, "  ")
    assert base_image.configured_base_image() == "python:3.11-slim-bookworm"


@pytest.mark.parametrize(
    ("ref", "repo", "tag"),
    [
        ("python:3.11-slim-bookworm", "python", "3.11-slim-bookworm"),
        ("python", "python", "latest"),
        ("localhost:5000/py", "localhost:5000/py", "latest"),
        ("localhost:5000/py:3", "localhost:5000/py", "3"),
        ("py@sha256:abc", "py", "sha256:abc"),
    ],
)
def test_split_ref(ref: str, repo: str, tag: str) -> None:
    assert base_image._split_ref(ref) == (repo, tag)


def test_slim_rootfs_removes_caches_docs_and_keeps_what_matters(tmp_path: Path) -> None:
    root = tmp_path

    def put(rel: str, data: str = "x" * 100) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
        return path

    removed = [
        put("var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease"),
        put("var/cache/apt/archives/bash_5.2_amd64.deb"),
        put("var/cache/apt/pkgcache.bin"),
        put("usr/share/man/man1/ls.1.gz"),
        put("usr/share/doc/bash/changelog.gz"),
        put("usr/share/locale/de/LC_MESSAGES/apt.mo"),
        put("usr/share/info/coreutils.info.gz"),
        put("usr/lib/python3/dist-packages/__pycache__/x.cpython-311.pyc"),
        put("var/log/dpkg.log"),
    ]
    kept = [
        put("usr/share/doc/bash/copyright"),
        put("usr/share/locale/locale.alias"),
        put("usr/lib/python3.11/__pycache__/os.cpython-311.pyc"),
        put("usr/lib/python3.11/asyncio/__pycache__/base_events.cpython-311.pyc"),
        put("usr/bin/python3.11"),
        put("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
    ]
    put("etc/resolv.conf", "nameserver 10.0.0.1\n")
    freed = base_image.slim_rootfs(root)
    assert freed >= 100 * len(removed)
    assert [p for p in removed if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (
        "path-exclude /usr/share/doc/*"
        in (root / "etc/dpkg/dpkg.cfg.d/composemesh-slim").read_text()
    )
    sources = (root / "etc/apt/sources.list").read_text()
    assert "deb http://deb.debian.org/debian-security bookworm-security main" in sources


def test_remove_tree_removes_a_plain_directory(tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "b" / "f").write_text("x")
    base_image.remove_tree(target)
    assert not target.exists()
    base_image.remove_tree(target)  # gone already: fine


def test_missing_debootstrap_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(base_image, "SBIN_DIRS", ())
    with pytest.raises(ImageBuildError, match="debootstrap is not installed"):
        base_image.build_fallback_base(client=None)


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
