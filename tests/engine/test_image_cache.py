"""Tests of what the engine keeps of our builds: which image is this build's stage tip, which
of its layers is the dependency layer (pure), and that the sweep removes only what no tag
names (against a stand-in engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import docker.errors

from composemesh.engine import image_cache
from composemesh.engine.image_cache import (
    BUILD_CACHE_IMAGE,
    DEPS_STEP,
    LABEL_BUILD_CACHE,
    LABEL_IMAGE,
    build_cache_layer,
    newest_first,
)


def image(image_id: str, created: str = "", tags: tuple[str, ...] = (), history: Any = ()) -> Any:
    return SimpleNamespace(
        id=image_id,
        tags=list(tags),
        attrs={"Created": created},
        history=lambda: list(history),
        tag=None,
    )


def test_newest_first_orders_by_creation() -> None:
    images = [image("a", "2024-01-01T00:00:01Z"), image("b", "2024-01-02T00:00:00Z"), image("c")]
    assert [i.id for i in newest_first(images)] == ["b", "a", "c"]


def test_the_dependency_layer_is_the_first_of_the_deps_step_with_an_id_of_its_own() -> None:
    history = [
        {"Id": "sha256:tip", "CreatedBy": "/bin/sh -c #(nop)  LABEL x"},
        {"Id": "<missing>", "CreatedBy": f"/bin/sh -c pip install -r {DEPS_STEP} # elsewhere"},
        {"Id": "sha256:deps", "CreatedBy": f"/bin/sh -c set -e; pip install -r {DEPS_STEP}"},
        {"Id": "sha256:older", "CreatedBy": f"/bin/sh -c pip install -r {DEPS_STEP}"},
    ]
    assert build_cache_layer(history) == "sha256:deps"
    assert build_cache_layer(history[:2]) is None
    assert build_cache_layer([]) is None


class Engine:
    """A stand-in for the Docker engine's image API (unit tests run without an engine): it
    lists what it was given, records tags and removals, and refuses to remove ``in_use``."""

    def __init__(self, images: list[Any], in_use: frozenset[str] = frozenset()) -> None:
        self.by_id = {i.id: i for i in images}
        self.in_use = in_use
        self.listed: list[dict[str, Any]] = []
        self.removed: list[tuple[str, bool]] = []
        self.tagged: list[tuple[str, str]] = []
        self.images = self

    def list(self, filters: dict[str, Any]) -> list[Any]:
        self.listed.append(filters)
        return [i for i in self.by_id.values() if not i.tags]

    def get(self, image_id: str) -> Any:
        found = self.by_id.get(image_id) or image(image_id)
        found.tag = lambda name: self.tagged.append((image_id, name))
        return found

    def remove(self, image_id: str, noprune: bool) -> None:
        if image_id in self.in_use:
            raise docker.errors.APIError("conflict: image is being used by a container")
        self.removed.append((image_id, noprune))


def test_the_sweep_removes_replaced_images_and_leaves_those_in_use() -> None:
    engine = Engine([image("old"), image("used"), image("current", tags=("composemesh:0.1.0",))],
                    in_use=frozenset({"used"}))  # fmt: skip
    image_cache.sweep_replaced(engine)
    assert engine.listed == [{"dangling": True, "label": LABEL_IMAGE}]
    assert engine.removed == [("old", False)]


def test_a_tag_that_came_meanwhile_saves_the_image() -> None:
    late = image("late")
    engine = Engine([late])
    engine.list = lambda filters: [image("late")]  # type: ignore[method-assign]
    late.tags = ["composemesh:0.1.0"]  # tagged between the listing and the removal
    image_cache.sweep_replaced(engine)
    assert engine.removed == []


def test_the_build_cache_keeps_the_dependency_layer_of_the_newest_stage_tip() -> None:
    deps = {"Id": "sha256:deps", "CreatedBy": f"RUN pip install -r {DEPS_STEP}"}
    old = {"Id": "sha256:olddeps", "CreatedBy": f"RUN pip install -r {DEPS_STEP}"}
    engine = Engine(
        [
            image("sha256:oldtip", "2024-01-01T00:00:00Z", history=[old]),
            image("sha256:tip", "2024-02-01T00:00:00Z", history=[deps]),
        ]
    )
    image_cache.keep_build_cache(engine)
    assert engine.listed == [{"dangling": True, "label": f"{LABEL_BUILD_CACHE}=venv"}]
    assert engine.tagged == [("sha256:deps", BUILD_CACHE_IMAGE)]
    assert engine.removed == [("sha256:tip", False), ("sha256:oldtip", False)]
