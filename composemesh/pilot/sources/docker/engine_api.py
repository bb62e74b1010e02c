"""A small async client of the Docker Engine HTTP API over its unix socket (aiohttp)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from composemesh.errors import EngineError


def socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise EngineError(f"DOCKER_HOST {host!r}: the pilot needs the engine's unix socket")
    return host.removeprefix("unix://")


class EngineAPI:
    """The handful of engine endpoints the pilot uses: list, inspect, events."""

    def __init__(self, path: str | None = None) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path or socket_path()),
            base_url="http://docker",
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _get_json(self, url: str, **params: str) -> Any:
        try:
            async with self._session.get(url, params=params) as resp:
                if resp.status >= 400:
                    raise EngineError(f"engine {url}: {resp.status} {await resp.text()}")
                return await resp.json()
        except aiohttp.ClientError as exc:
            raise EngineError(f"engine {url}: {exc}") from None

    async def containers(self, *, project: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [f"com.docker.compose.project={project}"]})
        result: list[dict[str, Any]] = await self._get_json(
            "/containers/json", all="1", filters=filters
        )
        return result

    async def inspect(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._get_json(f"/containers/{container}/json")
        return result

    async def restart(self, container: str, timeout_s: int = 2) -> None:
        try:
            async with self._session.post(
                f"/containers/{container}/restart", params={"t": str(timeout_s)}
            ) as resp:
                if resp.status >= 400:
                    raise EngineError(f"engine restart {container}: {await resp.text()}")
        except aiohttp.ClientError as exc:
            raise EngineError(f"engine restart {container}: {exc}") from None

    async def events(self, *, project: str) -> AsyncIterator[dict[str, Any]]:
        """Container events of the project, as they happen; ends when the engine closes it."""
        filters = json.dumps(
            {"type": ["container"], "label": [f"com.docker.compose.project={project}"]}
        )
        try:
            async with self._session.get("/events", params={"filters": filters}) as resp:
                if resp.status >= 400:
                    raise EngineError(f"engine /events: {resp.status} {await resp.text()}")
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientError as exc:
            raise EngineError(f"engine /events: {exc}") from None
