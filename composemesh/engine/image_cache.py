"""What the engine keeps of our builds: the dependency layer of the mesh image is kept (and
tagged) for the next build, images that a rebuild replaced are removed once unused.

The choices (which image is this build's stage tip, which of its layers is the dependency
layer) are pure functions of what the engine lists; the rest asks the engine, and a refusal
(an image still in use, already gone) leaves the image for a later sweep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BUILD_CACHE_IMAGE",
    "LABEL_BUILD_CACHE",
    "LABEL_IMAGE",
    "build_cache_layer",
    "keep_build_cache",
    "newest_first",
    "remove_untagged",
    "sweep_replaced",
]

# Our images carry LABEL_IMAGE (mesh, demo): an untagged one was replaced by a rebuild.
LABEL_IMAGE = "composemesh.image"
# The venv stage of mesh.Dockerfile carries LABEL_BUILD_CACHE=venv.
LABEL_BUILD_CACHE = "composemesh.build-cache"
BUILD_CACHE_IMAGE = "composemesh-build-cache:deps"
# The step of that stage that installs the dependencies (its CreatedBy names this file).
DEPS_STEP = "/wheels/deps/requirements.txt"


def newest_first(images: Iterable[Any]) -> list[Any]:
    """Engine images (anything with ``attrs``), the most recently created first. Pure."""
    return sorted(images, key=lambda image: str(image.attrs.get("Created", "")), reverse=True)


def build_cache_layer(history: Sequence[Mapping[str, Any]]) -> str | None:
    """The id of the dependency layer in an image's history (as the engine lists it, newest
    layer first), or None: the first layer made by the DEPS_STEP step that is an image of its
    own (``sha256:`` id; layers built elsewhere say ``<missing>``). Pure."""
    for layer in history:
        layer_id = str(layer.get("Id", ""))
        if DEPS_STEP in str(layer.get("CreatedBy", "")) and layer_id.startswith("sha256:"):
            return layer_id
    return None


def keep_build_cache(client: Any) -> None:
    """Tags the dependency layer of the mesh image's venv stage and removes the rest.

    The classic builder leaves each earlier stage of a multi-stage build as an untagged image.
    Its dependency layer is worth keeping (the next build after a source change reuses it):
    it is tagged BUILD_CACHE_IMAGE. Every other untagged image of that stage (this build's
    stage tip, dependency layers of older dependency sets) is removed.
    """
    import docker.errors

    label = f"{LABEL_BUILD_CACHE}=venv"
    with contextlib.suppress(docker.errors.DockerException):
        stale = newest_first(client.images.list(filters={"dangling": True, "label": label}))
        if stale:  # the newest is this build's stage tip
            layer_id = build_cache_layer(stale[0].history())
            if layer_id is not None:
                client.images.get(layer_id).tag(BUILD_CACHE_IMAGE)
        for image in stale:
            remove_untagged(client, image.id, prune=True)


def remove_untagged(client: Any, image_id: str, *, prune: bool) -> None:
    """Removes an image that has no tag and no container; its untagged parents too if
    ``prune``. Anything still in use stays (the engine refuses, and that is fine)."""
    import docker.errors

    with contextlib.suppress(docker.errors.DockerException):
        image = client.images.get(image_id)  # asked again: it may have been tagged meanwhile
        if not image.tags:
            client.images.remove(image.id, noprune=not prune)


def sweep_replaced(client: Any) -> None:
    """Removes mesh and demo images that a rebuild replaced (untagged, labelled by us) once
    no container uses them any more; those still in use stay until a later build."""
    import docker.errors

    with contextlib.suppress(docker.errors.DockerException):
        for image in client.images.list(filters={"dangling": True, "label": LABEL_IMAGE}):
            remove_untagged(client, image.id, prune=True)
