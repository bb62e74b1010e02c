"""Pure tests of composemesh's dependency set: requirements in one spelling (parsed with
packaging), the extras left out, the pins of what is installed here. No engine, no network."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from composemesh.engine.requirements import (
    dependency_lock,
    is_extra_only,
    normalized_requirement,
    runtime_requirements,
)
from composemesh.engine.sources import locate_sources

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    ("requirement", "extra_only"),
    [
        ('pytest>=8; extra == "test"', True),
        ("x; python_version < '3.12' and extra=='a'", True),
        ("uvloop>=0.19; sys_platform != 'win32'", False),
        ("click>=8", False),
        ("x; platform_release == 'extra'", False),  # a value, not the variable
        ("not a requirement ; extra", False),
    ],
)
def test_is_extra_only(requirement: str, extra_only: bool) -> None:
    assert is_extra_only(requirement) is extra_only


def test_a_requirement_that_does_not_parse_is_left_as_written() -> None:
    assert normalized_requirement("  not a requirement (  ") == "not a requirement ("
    assert dependency_lock(["not a requirement ("]) == []
