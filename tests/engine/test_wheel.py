"""Pure tests of the wheel repacked from an installed composemesh: its RECORD lists every
file with the right hash and size (read back with zipfile), leaves out what belongs to the
installation, and lists itself without a hash. No engine, no pip, no network."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

from composemesh.engine.wheel import last_error, record_line, repack_distribution

INFO = "composemesh-0.1.0.dist-info"


def installed(site: Path) -> importlib.metadata.Distribution:
    """A composemesh installed into ``site`` as pip leaves it (a real dist-info directory
    read by importlib.metadata), with bytecode and installer files the wheel must not get."""
    files = {
        "composemesh/__init__.py": b'__version__ = "0.1.0"\n',
        "composemesh/engine/dockerfiles/mesh.Dockerfile": b"FROM scratch\n",
        "composemesh/__pycache__/__init__.cpython-311.pyc": b"\0\0",
        f"{INFO}/METADATA": b"Metadata-Version: 2.1\nName: composemesh\nVersion: 0.1.0\n",
        f"{INFO}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{INFO}/entry_points.txt": b"[console_scripts]\ncomposemesh = composemesh.cli:main\n",
        f"{INFO}/INSTALLER": b"pip\n",
        f"{INFO}/REQUESTED": b"",
        f"{INFO}/direct_url.json": b'{"url": "file:///tmp/x.whl"}',
    }
    for name, data in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(data)
    record = [record_line(name, data) for name, data in files.items()]
    record += [f"{INFO}/RECORD,,", "../../../bin/composemesh,sha256=x,1"]
    (site / INFO / "RECORD").write_text("\n".join(record) + "\n")
    return importlib.metadata.PathDistribution(site / INFO)


def test_record_line_is_the_wheel_format() -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"abc").digest()).rstrip(b"=").decode()
    assert record_line("a/b.py", b"abc") == f"a/b.py,sha256={digest},3"
    assert "=" not in record_line("x", b"abc").split("sha256=")[1].split(",")[0]


def test_the_repacked_wheel_has_a_valid_record(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "out").mkdir()
    path = repack_distribution(installed(tmp_path / "site"), tmp_path / "out")
    assert path.name == "composemesh-0.1.0-py3-none-any.whl"

    with zipfile.ZipFile(path) as whl:
        assert whl.testzip() is None
        names = set(whl.namelist())
        rows = list(csv.reader(io.StringIO(whl.read(f"{INFO}/RECORD").decode())))
        listed = {row[0]: row for row in rows}
        assert set(listed) == names  # every file listed, nothing listed that is not there
        assert listed[f"{INFO}/RECORD"] == [f"{INFO}/RECORD", "", ""]
        for name in names - {f"{INFO}/RECORD"}:
            data = whl.read(name)
            algorithm, _, digest = listed[name][1].partition("=")
            assert algorithm == "sha256"
            raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
            assert raw == hashlib.sha256(data).digest(), name
            assert int(listed[name][2]) == len(data), name

    assert {
        "composemesh/__init__.py",
        "composemesh/engine/dockerfiles/mesh.Dockerfile",
        f"{INFO}/METADATA",
        f"{INFO}/WHEEL",
        f"{INFO}/entry_points.txt",
    } <= names
    left_out = [n for n in names if "__pycache__" in n or n.startswith("..")]
    left_out += [n for n in names if n.rsplit("/", 1)[-1] in ("INSTALLER", "REQUESTED")]
    left_out += [n for n in names if n.endswith("direct_url.json")]
    assert left_out == []


def test_last_error_names_the_line_that_says_what_went_wrong() -> None:
    lines = ["Processing ./src", "ERROR: No matching distribution found for setuptools", "done"]
    assert last_error(lines) == "ERROR: No matching distribution found for setuptools"
    assert last_error(["a", "b "]) == "b"
    assert last_error([]) == "no output"
