"""The CA as the pilot runs it: its root on the state volume, attested issuance, what was issued."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from composemesh.ca import (
    CertificateAuthority,
    IssuanceRefused,
    Root,
    SignedCertificate,
    SpiffeId,
    cert_from_pem,
    cert_to_pem,
    check_user_root,
    fingerprint,
    key_from_pem,
    key_to_pem,
    make_root,
)
from composemesh.ca.pki import check_root
from composemesh.errors import ConfigError, MeshError
from composemesh.model.ca_config import MTLS, CAConfig, parse_ca_config
from composemesh.model.mesh import Workload
from composemesh.model.settings import MeshSettings

log = logging.getLogger("composemesh.pilot.ca")

ENV_STATE_DIR = "COMPOSEMESH_STATE_DIR"
ENV_CA_CERT_FILE = "COMPOSEMESH_CA_CERT_FILE"  # the user's root, where the injector mounted it
ENV_CA_KEY_FILE = "COMPOSEMESH_CA_KEY_FILE"
DEFAULT_STATE_DIR = "/var/lib/composemesh"
CA_DIR = "ca"
ROOT_CERT = "root.pem"
ROOT_KEY = "root-key.pem"
ISSUED = "issued.json"
DIR_MODE = 0o700
KEY_MODE = 0o600
ROOT_COMMON_NAME = "composemesh root CA"

Clock = Callable[[], datetime]
RootSource = Literal["generated", "stored", "user"]


class CAStateError(MeshError):
    """The CA's state on its volume cannot be used as it is; the message says how to recover."""


@dataclass(frozen=True)
class IssuedRecord:
    """One certificate the CA signed for a node: public facts only (what status shows)."""

    node: str
    spiffe: str
    serial: str  # hex, as openssl shows it
    not_before: str  # ISO 8601, UTC
    not_after: str
    issued_at: str
    address: str  # the caller's address the attestation found the node at

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.not_after) <= now


def _system_clock() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def serial_hex(cert: x509.Certificate) -> str:
    """The certificate's serial number in lower-case hex (no separators)."""
    return f"{cert.serial_number:x}"


class CAService:
    """The pilot's CA: signs CSRs for the identity attested from the caller's address."""

    def __init__(
        self,
        authority: CertificateAuthority,
        project: str,
        source: RootSource,
        state_dir: Path | None = None,
        clock: Clock = _system_clock,
    ) -> None:
        self.authority = authority
        self.project = project
        self.source: RootSource = source
        self.state_dir = state_dir  # where issued.json lives; None: kept in memory only
        self._clock = clock
        self.issued: dict[str, IssuedRecord] = self._load_issued()

    # ------------------------------------------------------------------ start-up

    @classmethod
    def load_or_create(
        cls,
        settings: MeshSettings,
        project: str,
        state_dir: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock = _system_clock,
    ) -> CAService:
        """The CA of ``project``: the user's root if given, else the stored one, else a new one.

        ConfigError for a user root that cannot serve (naming ``x-composemesh.mtls.root``);
        CAStateError for a stored root that cannot (its files damaged, or expired).
        """
        env = os.environ if environ is None else environ
        base = Path(state_dir or env.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR)
        config = ca_config_from(settings, env)
        now = clock()
        source: RootSource
        if config.user_root:
            root = check_user_root(config, now)
            assert root is not None
            source = "user"
            log.info("CA: the user's own root %s (%s)", root.cert.subject.rfc4514_string(),
                     fingerprint(root.cert))
        else:
            root, created = load_or_create_root(base / CA_DIR, settings.trust_domain, project, now)
            source = "generated" if created else "stored"
            log.info("CA: %s root %s (%s)", "generated a new" if created else "loaded the stored",
                     root.cert.subject.rfc4514_string(), fingerprint(root.cert))
        authority = CertificateAuthority(
            root.cert, root.key, settings.trust_domain,
            workload_ttl=timedelta(seconds=config.workload_ttl_s), clock=clock,
        )
        return cls(authority, project, source, base / CA_DIR, clock)

    # ------------------------------------------------------------------ issuance

    def attest(self, workload: Workload) -> SpiffeId:
        """The identity of the caller found at ``workload``: its project's mesh service."""
        try:
            return SpiffeId(self.authority.trust_domain, self.project, workload.service)
        except ValueError as exc:
            raise IssuanceRefused(f"no SPIFFE ID for node {workload.node}: {exc}") from None

    def issue(self, csr_pem: bytes, workload: Workload, address: str = "") -> SignedCertificate:
        """Sign ``csr_pem`` for the attested ``workload``; IssuanceRefused saying why not."""
        signed = self.authority.sign(csr_pem, self.attest(workload))
        cert = cert_from_pem(signed.cert_pem)
        self.issued[workload.node] = IssuedRecord(
            node=workload.node,
            spiffe=signed.spiffe.uri,
            serial=serial_hex(cert),
            not_before=_iso(cert.not_valid_before_utc),
            not_after=_iso(cert.not_valid_after_utc),
            issued_at=_iso(self._clock()),
            address=address,
        )
        self._save_issued()
        return signed

    def record_for(self, workload: Workload) -> IssuedRecord | None:
        """What was last issued to ``workload`` (None if nothing, or to an earlier container)."""
        record = self.issued.get(workload.node)
        if record is None or (record.address and record.address not in workload.addresses):
            return None
        return record

    # ------------------------------------------------------------------ what it shows

    @property
    def trust_bundle_pem(self) -> str:
        return self.authority.trust_bundle().decode()

    @property
    def root_cert(self) -> x509.Certificate:
        return self.authority.roots.active.cert

    def info(self) -> dict[str, Any]:
        """``GET /v1/ca``: the signing root and the trust bundle (all public)."""
        root = self.root_cert
        roots = self.authority.roots
        return {
            "project": self.project,
            "trust_domain": self.authority.trust_domain,
            "source": self.source,
            "subject": root.subject.rfc4514_string(),
            "serial": serial_hex(root),
            "not_before": _iso(root.not_valid_before_utc),
            "not_after": _iso(root.not_valid_after_utc),
            "fingerprint": fingerprint(root),
            "rotation_phase": roots.phase,
            "trusted": [
                {"subject": c.subject.rfc4514_string(), "fingerprint": fingerprint(c),
                 "not_after": _iso(c.not_valid_after_utc)}
                for c in roots.trusted
            ],
            "trust_bundle_pem": self.trust_bundle_pem,
            "workload_ttl_s": self.authority.workload_ttl.total_seconds(),
            "signed": self.authority.signed,
        }

    # ------------------------------------------------------------------ issued.json

    def _issued_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / ISSUED

    def _load_issued(self) -> dict[str, IssuedRecord]:
        path = self._issued_path()
        if path is None:
            return {}
        try:
            data = json.loads(path.read_text())
            records = {str(k): IssuedRecord(**v) for k, v in dict(data).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.error("ignoring unreadable %s: %s", path, exc)
            return {}
        now = self._clock()
        return {k: r for k, r in records.items() if not r.expired(now)}

    def _save_issued(self) -> None:
        path = self._issued_path()
        if path is None:
            return
        now = self._clock()
        live = {k: asdict(r) for k, r in sorted(self.issued.items()) if not r.expired(now)}
        try:
            _ensure_private_dir(path.parent)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(live, indent=2))
            os.replace(tmp, path)
        except OSError as exc:  # status loses its memory across a restart; issuance goes on
            log.error("cannot record issued certificates in %s: %s", path, exc)


def ca_config_from(settings: MeshSettings, environ: Mapping[str, str]) -> CAConfig:
    """The CA's settings from ``x-composemesh: mtls:``, the user's root files from the env.

    The root's paths in the compose file are the host's; the pilot reads the files where the
    injector mounted them, named by COMPOSEMESH_CA_CERT_FILE and COMPOSEMESH_CA_KEY_FILE.
    """
    config = parse_ca_config(settings.raw.get("mtls"), "/")
    cert_file, key_file = environ.get(ENV_CA_CERT_FILE, ""), environ.get(ENV_CA_KEY_FILE, "")
    if cert_file or key_file:
        if not (cert_file and key_file):
            missing = ENV_CA_KEY_FILE if cert_file else ENV_CA_CERT_FILE
            raise ConfigError(f"{missing} is not set; a root needs both its cert and its key",
                              field=f"{MTLS}.root")
        return replace(config, root_cert_path=Path(cert_file), root_key_path=Path(key_file))
    if config.user_root:
        raise ConfigError(
            f"the root did not reach the pilot: mount its files into the pilot container and "
            f"name them in {ENV_CA_CERT_FILE} and {ENV_CA_KEY_FILE}",
            field=f"{MTLS}.root",
        )
    return config


def load_or_create_root(
    directory: Path, trust_domain: str, project: str, now: datetime
) -> tuple[Root, bool]:
    """The root stored in ``directory`` (root.pem, root-key.pem), or a new one written there.

    Returns the root and whether it was created now. The directory is kept 0700 and the key
    0600. CAStateError when a stored root cannot sign (a key without its certificate is
    replaced; a certificate without its key, a mismatch or an expired root are not).
    """
    cert_path, key_path = directory / ROOT_CERT, directory / ROOT_KEY
    _ensure_private_dir(directory)
    if cert_path.exists():
        return _load_stored_root(cert_path, key_path, now), False
    if key_path.exists():
        log.warning("CA: %s has no certificate beside it; generating a new root", key_path)
    cert, key = make_root(f"{ROOT_COMMON_NAME} ({project})", trust_domain, now=now)
    _write_private(key_path, key_to_pem(key))  # the key first: a cert alone is never stored
    _write_public(cert_path, cert_to_pem(cert))
    return Root(cert, key), True


def _load_stored_root(cert_path: Path, key_path: Path, now: datetime) -> Root:
    recover = "remove the CA's volume (composemesh down -v) to start with a new root"
    if not key_path.exists():
        raise CAStateError(f"the CA's root key {key_path} is missing; {recover}")
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        log.warning("CA: %s had mode %o; set to %o", key_path, mode, KEY_MODE)
        os.chmod(key_path, KEY_MODE)
    try:
        cert = cert_from_pem(cert_path.read_bytes())
        key = key_from_pem(key_path.read_bytes())
        check_root(cert, key, now)
    except (OSError, ValueError) as exc:
        raise CAStateError(f"the CA's stored root cannot sign: {exc}; {recover}") from None
    return Root(cert, key)


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) != DIR_MODE:
        os.chmod(directory, DIR_MODE)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by its owner only from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.chmod(tmp, KEY_MODE)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
