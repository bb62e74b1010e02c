"""`composemesh check` reads the user's own root (x-composemesh: mtls: root:) and refuses one
that cannot serve, naming the field and the file; a good one passes and is mounted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from composemesh import cli
from composemesh.ca import cert_to_pem, generate_key, key_to_pem, make_root

COMPOSE = """\
x-composemesh:
  mtls:
    root: {cert: certs/root.pem, key: certs/root-key.pem}
services:
  web:
    image: busybox
"""
NOW = datetime.now(UTC)


def write(tmp_path: Path, made: datetime, lifetime: timedelta, mismatch: bool = False) -> Path:
    cert, key = make_root("acme root", "cluster.local", lifetime, now=made)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "root.pem").write_bytes(cert_to_pem(cert))
    (tmp_path / "certs" / "root-key.pem").write_bytes(
        key_to_pem(generate_key() if mismatch else key))
    compose = tmp_path / "compose.yaml"
    compose.write_text(COMPOSE)
    return compose


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    for console in (cli.out, cli.err):
        monkeypatch.setattr(console, "width", 300)


@pytest.mark.parametrize(
    ("made", "lifetime", "mismatch", "field", "reason"),
    [
        (NOW - timedelta(days=20), timedelta(days=10), False, "root.cert",
         "the certificate expired on"),
        (NOW + timedelta(days=2), timedelta(days=10), False, "root.cert", "is not valid until"),
        (NOW, timedelta(days=10), True, "root.key", "does not match"),
    ],
    ids=["expired", "not-yet-valid", "key-mismatch"],
)
def test_check_refuses_a_root_that_cannot_serve(
    tmp_path: Path, made: datetime, lifetime: timedelta, mismatch: bool, field: str, reason: str
) -> None:
    compose = write(tmp_path, made, lifetime, mismatch)
    result = CliRunner().invoke(cli.main, ["check", "-f", str(compose)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"x-composemesh.mtls.{field}" in text and reason in text, text
    assert str(tmp_path / "certs") in text


def test_check_accepts_a_good_root_and_inject_mounts_it(tmp_path: Path) -> None:
    compose = write(tmp_path, NOW, timedelta(days=10))
    result = CliRunner().invoke(cli.main, ["check", "-f", str(compose)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.main, ["inject", "-f", str(compose)])
    assert result.exit_code == 0, result.output
    assert f"source: {tmp_path.resolve() / 'certs' / 'root-key.pem'}" in result.output
    assert "target: /etc/composemesh/ca/root-key.pem" in result.output
