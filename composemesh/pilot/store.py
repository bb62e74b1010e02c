"""The pilot's memory that must outlive it: live route overrides, in its state volume."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from composemesh.atomic_file import write_atomic
from composemesh.pilot.ca_service import DEFAULT_STATE_DIR, ENV_STATE_DIR

log = logging.getLogger("composemesh.pilot.store")


class OverrideStore:
    """``routes.json``: service -> {version: weight}; written atomically, read at start."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        base = directory or os.environ.get(ENV_STATE_DIR, DEFAULT_STATE_DIR)
        self.path = Path(base) / "routes.json"

    def load(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s: %s", self.path, exc)
            return {}
        return {
            str(svc): {str(v): int(w) for v, w in weights.items()}
            for svc, weights in data.items()
            if isinstance(weights, dict)
        }

    def save(self, overrides: Mapping[str, Mapping[str, int]]) -> None:
        data = json.dumps({k: dict(v) for k, v in overrides.items()}, indent=2)
        write_atomic(self.path, data, 0o644)  # what the pilot's umask (022) gave it before
