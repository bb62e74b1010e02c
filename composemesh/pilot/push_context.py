"""The pilot's snapshots of one push: the mesh indexed once, each proxy's snapshot rendered and
encoded at most once, however often it polls and however often ``status`` asks.

A push is one mesh state with one trust bundle and signing root; a new state (a generation)
or a root rotation makes a new PushContext (``Pilot.push_context``), so nothing is ever
invalidated in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import Snapshot, encode_snapshot
from composemesh.pilot.render import PushIndex


@dataclass
class PushContext:
    """One push's index and the snapshots rendered from it, by workload."""

    index: PushIndex
    renders: int = 0  # snapshots rendered (each workload at most once)
    _snapshots: dict[Workload, tuple[Snapshot, bytes | None]] = field(default_factory=dict)

    @classmethod
    def build(cls, state: MeshState, trust_bundle: str = "", signing_root: str = "") -> PushContext:
        return cls(PushIndex.build(state, trust_bundle, signing_root))

    def serves(self, state: MeshState, trust_bundle: str, signing_root: str) -> bool:
        """Whether this push is of ``state`` with that bundle and signing root."""
        index = self.index
        return (index.state is state and index.trust_bundle == trust_bundle
                and index.signing_root == signing_root)

    def snapshot(self, workload: Workload) -> Snapshot:
        """``workload``'s snapshot, rendered the first time it is asked for."""
        found = self._snapshots.get(workload)
        if found is None:
            found = self._snapshots[workload] = (self.index.render(workload), None)
            self.renders += 1
        return found[0]

    def body(self, workload: Workload) -> bytes:
        """``workload``'s snapshot as the wire carries it, encoded the first time."""
        snapshot = self.snapshot(workload)
        encoded = self._snapshots[workload][1]
        if encoded is None:
            encoded = encode_snapshot(snapshot)
            self._snapshots[workload] = (snapshot, encoded)
        return encoded
