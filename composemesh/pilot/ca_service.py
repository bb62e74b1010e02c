"""The CA as the pilot runs it: its root on the state volume, attested issuance, what was issued."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509

from composemesh.atomic_file import write_atomic
from composemesh.ca import (
    CertificateAuthority,
    IssuanceRefused,
    Root,
    RootSet,
    RotationError,
    SignedCertificate,
    SpiffeId,
    begin_rotation,
    cert_from_pem,
    cert_to_pem,
    certs_from_pem,
    check_user_root,
    fingerprint,
    finish_rotation,
    key_from_pem,
    key_to_pem,
    make_root,
    steady,
    switch_signing,
)
from composemesh.ca.pki import check_root
from composemesh.ca.spiffe import WorkloadName
from composemesh.clock import Clock, system_clock
from composemesh.errors import ConfigError, MeshError
from composemesh.model.ca_config import (  # the user's root, where the injector mounted it
    ENV_CA_CERT_FILE,
    ENV_CA_KEY_FILE,
    MTLS,
    CAConfig,
    parse_ca_config,
)
from composemesh.model.mesh import Workload
from composemesh.model.settings import MeshSettings

log = logging.getLogger("composemesh.pilot.ca")

ENV_STATE_DIR = "COMPOSEMESH_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/composemesh"
CA_DIR = "ca"
ROOT_CERT = "root.pem"
ROOT_KEY = "root-key.pem"
ISSUED = "issued.json"
ROOTS = "roots.json"  # which stored roots sign and are trusted; absent: root.pem alone
ROOT_STEM = "root"  # a root is stored as <stem>.pem and <stem>-key.pem
DIR_MODE = 0o700
KEY_MODE = 0o600
PUBLIC_MODE = 0o644  # certificates, roots.json, issued.json: public facts
ROOT_COMMON_NAME = "composemesh root CA"

RootSource = Literal["generated", "stored", "user"]
RotationStep = Literal["begin", "switch", "finish"]
ROTATION_STEPS: tuple[RotationStep, ...] = ("begin", "switch", "finish")
RECENT_PER_NODE = 8  # issued records kept in memory per node, to match what a proxy holds


class CAStateError(MeshError):
    """The CA's state on its volume cannot be used as it is; the message says how to recover."""


class ExportRefused(MeshError):
    """The CA's root may not be exported now; the message is the one sentence saying why."""


@dataclass(frozen=True)
class IssuedRecord:
    """One certificate the CA signed for a node: public facts only (what status shows)."""

    node: str
    spiffe: str
    serial: str  # hex, as openssl shows it
    not_before: str  # ISO 8601, UTC
    not_after: str
    issued_at: str
    container: str = ""  # the id of the proxy container the attestation found asking
    issuer_fingerprint: str = ""  # the root that signed it ("" in records of older pilots)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> IssuedRecord:
        """A record as stored; keys of older pilots (``address``) are left out."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in names})

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.not_after) <= now


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def serial_hex(cert: x509.Certificate) -> str:
    """The certificate's serial number in lower-case hex (no separators)."""
    return f"{cert.serial_number:x}"


class CAService:
    """The pilot's CA: signs CSRs for the identity the kernel attested for the calling proxy."""

    def __init__(
        self,
        authority: CertificateAuthority,
        project: str,
        source: RootSource,
        state_dir: Path | None = None,
        clock: Clock = system_clock,
        stems: Mapping[str, str] | None = None,
    ) -> None:
        self.authority = authority
        self.project = project
        self.source: RootSource = source
        self.state_dir = state_dir  # where issued.json and roots live; None: in memory only
        self._clock = clock
        # the file stem of each stored root, by fingerprint (what roots.json names)
        self._stems: dict[str, str] = dict(stems or {fingerprint(self.root_cert): ROOT_STEM})
        self.issued: dict[str, IssuedRecord] = self._load_issued()  # the last, by node
        # the last few by node and serial: a proxy may hold one issued before its last
        self._recent: dict[str, dict[str, IssuedRecord]] = {
            node: {r.serial: r} for node, r in self.issued.items()}

    # ------------------------------------------------------------------ start-up

    @classmethod
    def load_or_create(
        cls,
        settings: MeshSettings,
        project: str,
        state_dir: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock = system_clock,
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
        stems: dict[str, str] = {}
        if config.user_root:
            root = check_user_root(config, now)
            assert root is not None
            source = "user"
            roots = steady(root)
            log.info("CA: the user's own root %s (%s)", root.cert.subject.rfc4514_string(),
                     fingerprint(root.cert))
        else:
            roots, stems, created = load_or_create_roots(
                base / CA_DIR, settings.trust_domain, project, now
            )
            root = roots.active
            source = "generated" if created else "stored"
            log.info("CA: %s root %s (%s)", "generated a new" if created else "loaded the stored",
                     root.cert.subject.rfc4514_string(), fingerprint(root.cert))
            if roots.phase != "steady":
                log.info("CA: a root rotation is under way (phase %s)", roots.phase)
        authority = CertificateAuthority(
            root.cert, root.key, settings.trust_domain,
            workload_ttl=timedelta(seconds=config.workload_ttl_s), clock=clock,
        )
        authority.use_roots(roots)
        return cls(authority, project, source, base / CA_DIR, clock, stems or None)

    # ------------------------------------------------------------------ root rotation

    def rotate(self, step: str) -> RootSet:
        """Take one step of a root rotation (begin, switch, finish), stored before it is used.

        RotationError (nothing changed) for the user's own root, an unknown step, or a step
        that does not follow the current phase. ``begin`` makes a new root like the first;
        ``switch`` drops the old root's key; ``finish`` its certificate.
        """
        if self.source == "user":
            raise RotationError(
                "the root is the user's own (x-composemesh.mtls.root): rotate it by replacing "
                "its files and recreating the pilot"
            )
        if step not in ROTATION_STEPS:
            raise RotationError(f"unknown rotation step {step!r}; the steps are "
                                f"{', '.join(ROTATION_STEPS)}")
        old = self.authority.roots
        now = self._clock()
        if step == "begin":
            cert, key = make_root(f"{ROOT_COMMON_NAME} ({self.project})",
                                  self.authority.trust_domain, now=now)
            new = begin_rotation(old, Root(cert, key), now)
            self._stems[fingerprint(cert)] = f"{ROOT_STEM}-{serial_hex(cert)[:16]}"
        elif step == "switch":
            new = switch_signing(old)
        else:
            new = finish_rotation(old)
        try:
            self._store(new)
        except OSError:
            self._forget(old)  # a new root's files, if it got that far: the old set stands
            raise
        self.authority.use_roots(new)
        self._forget(new)
        log.info("CA: root rotation %s: %s signs, %d root(s) trusted", step,
                 fingerprint(new.active.cert), len(new.trusted))
        return new

    def _store(self, roots: RootSet) -> None:
        """Write ``roots``: an incoming root's files first, then ``roots.json`` at once."""
        if self.state_dir is None:
            return
        if roots.incoming is not None:
            fp = fingerprint(roots.incoming.cert)
            _store_root(self.state_dir, self._stems[fp], roots.incoming)
        _write_public(self.state_dir / ROOTS, _manifest(roots, self._stems))

    def _forget(self, roots: RootSet) -> None:
        """Delete what ``roots`` no longer needs: a key that will not sign, a cert not trusted."""
        signing = {fingerprint(r.cert) for r in (roots.active, roots.incoming) if r is not None}
        trusted = {fingerprint(c) for c in roots.trusted}
        for fp, stem in list(self._stems.items()):
            unneeded = [f"{stem}-key.pem"] if fp not in signing else []
            if fp not in trusted:
                unneeded.append(f"{stem}.pem")
                del self._stems[fp]
            for name in unneeded:
                if self.state_dir is not None:
                    with contextlib.suppress(FileNotFoundError):
                        (self.state_dir / name).unlink()

    # ------------------------------------------------------------------ export

    def export_root(self) -> tuple[bytes, bytes]:
        """The signing root's certificate and private key as PEM, for `composemesh certs
        export` (another host's project imports them to share this trust root).

        ExportRefused for the user's own root (its files are the user's already) and while a
        root rotation is under way (two roots: the one to share is not settled yet).
        """
        if self.source == "user":
            raise ExportRefused(
                "the root is your own files (x-composemesh.mtls.root): copy them")
        roots = self.authority.roots
        if roots.phase != "steady" or roots.incoming is not None:
            raise ExportRefused(
                f"a root rotation is under way (phase {roots.phase}): finish "
                "`composemesh certs rotate-root` first")
        return cert_to_pem(roots.active.cert), key_to_pem(roots.active.key)

    # ------------------------------------------------------------------ issuance

    def attest(self, workload: Workload) -> SpiffeId:
        """The identity of the caller found at ``workload``: its project's mesh service."""
        try:
            return SpiffeId(self.authority.trust_domain, self.project, workload.service)
        except ValueError as exc:
            raise IssuanceRefused(f"no SPIFFE ID for node {workload.node}: {exc}") from None

    def attest_name(self, workload: Workload) -> WorkloadName | None:
        """The compose service and version of the caller found at ``workload`` (None where
        a part is not a name a certificate can carry: the SPIFFE ID alone then)."""
        try:
            return WorkloadName(self.project, workload.compose_service, workload.version)
        except ValueError:
            return None

    def issue(self, csr_pem: bytes, workload: Workload, container: str = "") -> SignedCertificate:
        """Sign ``csr_pem`` for the attested ``workload``, whose proxy ``container`` asked;
        IssuanceRefused saying why not."""
        signed = self.authority.sign(csr_pem, self.attest(workload), self.attest_name(workload))
        cert, issuer = certs_from_pem(signed.chain_pem)[:2]
        record = IssuedRecord(
            node=workload.node,
            spiffe=signed.spiffe.uri,
            serial=serial_hex(cert),
            not_before=_iso(cert.not_valid_before_utc),
            not_after=_iso(cert.not_valid_after_utc),
            issued_at=_iso(self._clock()),
            container=container,
            issuer_fingerprint=fingerprint(issuer),
        )
        self.issued[workload.node] = record
        recent = self._recent.setdefault(workload.node, {})
        recent[record.serial] = record
        while len(recent) > RECENT_PER_NODE:
            del recent[next(iter(recent))]
        self._save_issued()
        return signed

    def record_for(self, workload: Workload, serial: str | None = None) -> IssuedRecord | None:
        """The certificate of serial ``serial`` issued to ``workload`` (what its proxy says it
        holds), or without a serial the last one issued to its current proxy container; None
        if the CA has no such record."""
        if serial is not None:
            return self._recent.get(workload.node, {}).get(serial)
        record = self.issued.get(workload.node)
        if record is None or (record.container and record.container != workload.proxy_container_id):
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
            records = {str(k): IssuedRecord.from_json(v) for k, v in dict(data).items()}
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
            write_atomic(path, json.dumps(live, indent=2), PUBLIC_MODE)
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


def load_or_create_roots(
    directory: Path, trust_domain: str, project: str, now: datetime
) -> tuple[RootSet, dict[str, str], bool]:
    """The stored root set (a rotation resumes where it was), or a new root written there.

    Returns the root set, each root's file stem by fingerprint, and whether a root was
    created now. Without ``roots.json`` the one root is ``root.pem`` (``load_or_create_root``).
    CAStateError for a root set that cannot be used.
    """
    manifest = directory / ROOTS
    if not manifest.exists():
        root, created = load_or_create_root(directory, trust_domain, project, now)
        return steady(root), {fingerprint(root.cert): ROOT_STEM}, created
    _ensure_private_dir(directory)
    recover = "remove the CA's volume (composemesh down -v) to start with a new root"
    try:
        data = json.loads(manifest.read_text())
        phase, active_stem = str(data["phase"]), str(data["active"])
        trusted_stems = [str(s) for s in data["trusted"]]
        incoming_stem = data.get("incoming")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CAStateError(f"the CA's {manifest} cannot be read: {exc}; {recover}") from None

    def stored(stem: str) -> Root:
        return _load_stored_root(directory / f"{stem}.pem", directory / f"{stem}-key.pem", now)

    try:
        active = stored(active_stem)
        incoming = stored(str(incoming_stem)) if incoming_stem else None
        trusted = tuple(
            active.cert if s == active_stem else incoming.cert if incoming and s == incoming_stem
            else cert_from_pem((directory / f"{s}.pem").read_bytes())
            for s in trusted_stems
        )
        roots = RootSet(active, trusted, incoming, phase)  # type: ignore[arg-type]
    except (OSError, ValueError, RotationError) as exc:
        raise CAStateError(f"the CA's stored roots cannot be used: {exc}; {recover}") from None
    return roots, {fingerprint(c): s for c, s in zip(trusted, trusted_stems, strict=True)}, False


def _manifest(roots: RootSet, stems: Mapping[str, str]) -> bytes:
    """``roots.json``: the phase and the stems of the active, trusted and incoming roots."""
    data = {
        "phase": roots.phase,
        "active": stems[fingerprint(roots.active.cert)],
        "trusted": [stems[fingerprint(c)] for c in roots.trusted],
        "incoming": stems[fingerprint(roots.incoming.cert)] if roots.incoming else None,
    }
    return json.dumps(data, indent=2).encode()


def _store_root(directory: Path, stem: str, root: Root) -> None:
    """``<stem>-key.pem`` (0600) then ``<stem>.pem``: a certificate is never stored alone."""
    _ensure_private_dir(directory)
    _write_private(directory / f"{stem}-key.pem", key_to_pem(root.key))
    _write_public(directory / f"{stem}.pem", cert_to_pem(root.cert))


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
    _store_root(directory, ROOT_STEM, Root(cert, key))
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
    """A key: readable by its owner only from the first byte, and on disk before the rename."""
    write_atomic(path, data, KEY_MODE, durable=True)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate or the roots manifest, readable by all (a test makes this one fail)."""
    write_atomic(path, data, PUBLIC_MODE)
