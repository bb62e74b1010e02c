"""Writing a file so that a reader sees the old content or the new one, never a half: write
a sibling temporary file with its final mode from the first byte, then rename it over."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, *,
                 durable: bool = False) -> None:
    """Replace ``path`` with ``data`` at once; the file has ``mode`` from creation (a secret
    is never readable by others, even for an instant). ``durable`` syncs it to disk first
    (keys: a crash must not leave an empty file behind the new name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits away at creation
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)
