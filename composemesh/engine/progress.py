"""How the image builders report what they do: ``progress(stage, detail)``.

The stages are listed where they are reported from (:mod:`composemesh.engine.images` and
:mod:`composemesh.engine.base_image`); a caller that does not listen passes nothing and
gets :func:`no_progress`.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "no_progress"]

Progress = Callable[[str, str], None]


def no_progress(stage: str, detail: str) -> None:
    """Reports nothing: the progress of a caller that does not listen."""
