"""Pure tests of what is hashed into an image's source-hash label: the hash follows every
input, ignores what is not one, and is the same across runs and checkouts. No engine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from composemesh.engine.image_tags import content_hash, demo_inputs, mesh_inputs
from composemesh.engine.sources import SourceTree, locate_sources

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


def test_the_hash_of_fixed_inputs_is_pinned(tmp_path: Path) -> None:
    """The same inputs give the same hash in every run, and the one that the code before the
    split of engine/images.py gave: a change here rebuilds every user's images, so it must be
    on purpose (then HASH_SCHEME says so)."""
    pkg = tmp_path / "composemesh"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("v=1\n")
    (pkg / "engine" / "x.py").write_text("X=1\n")
    (pkg / "engine" / "x.py").chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname='composemesh'\n")
    tree = SourceTree(package_dir=pkg, project_root=tmp_path)
    files, extra = mesh_inputs(
        tree, base_id="sha256:b", requirements=["click>=8.1"], lock=["click==8.1.7"]
    )
    assert set(files) == {
        "pkg/__init__.py",
        "pkg/engine/x.py",
        "project/pyproject.toml",
        "dockerfile/mesh",
    }
    assert set(extra) == {"base", "requirements", "lock", "proxy-uid"}
    files["dockerfile/mesh"] = tmp_path / "pyproject.toml"  # not the live Dockerfile
    if not os.access(pkg / "engine" / "x.py", os.X_OK):
        pytest.skip("no executable bit on this file system")
    pinned = "1644b703a9b5ad265a7e5fd3ba6d6944b6c818cfc7a2261b24f94563f51e2f5a"
    assert content_hash(files, extra) == pinned
    assert content_hash({}, {"k": "v"}) == (
        "f4aa78f4ae2786c5fca6a860eb17ef97fe9f729f2c179558ab35f6e320371aa3"
    )
