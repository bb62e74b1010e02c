"""An async client of the few Consul HTTP API endpoints the mesh uses; every failure a ConsulError.

Over aiohttp, on the documented API (https://developer.hashicorp.com/consul/api-docs): the
agent's service registration and TTL checks, the catalog's list of services and the health of
one service's instances, both as blocking queries. The token goes in ``X-Consul-Token``, the
datacenter in ``dc``. What comes back is converted at once (``composemesh.consul.convert``);
nothing of aiohttp or of Consul's JSON leaves this module.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from composemesh.consul import convert
from composemesh.errors import MeshError
from composemesh.model.consul import CatalogInstance, ConsulSettings, ExportedInstance

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds for a call that does not block
DEFAULT_WAIT = 60.0  # seconds a blocking query may hang
MAX_WAIT = 600.0  # Consul's limit


class ConsulError(MeshError):
    """Consul could not be reached or refused; ``str()`` is the one sentence to show.

    ``kind`` says which, for the caller to decide: ``unreachable`` (try again later),
    ``acl`` (the token is refused: an error until the user fixes it), ``status`` (any other
    refusal) or ``invalid`` (an answer that is not as documented).
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status

    @property
    def unknown_check(self) -> bool:
        """The agent does not know the check a TTL update named: it lost its state (a restart
        without its data) or the registration was removed. Current agents answer 404
        ``Unknown check "<id>"``, older ones 500 ``CheckID "<id>" does not have associated
        TTL``; the cure is the same, register again."""
        return self.kind == "status" and (
            self.status == 404 or "does not have associated TTL" in str(self)
            or "Unknown check" in str(self))


class ConsulClient:
    """One agent's API. Use as ``async with ConsulClient(settings) as consul:``."""

    def __init__(self, settings: ConsulSettings, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --------------------------------------------------------------------------- writes

    async def register(self, instance: ExportedInstance) -> str:
        """Register (or re-register, replacing) ``instance`` with its TTL check; its ID."""
        body = convert.registration(instance, self.settings)
        await self._call("PUT", "/v1/agent/service/register",
                         params={"replace-existing-checks": "true"}, body=body)
        return str(body["ID"])

    async def deregister(self, service_id: str) -> None:
        """Remove the registration ``service_id`` and its check (none: no action)."""
        await self._call("PUT", f"/v1/agent/service/deregister/{_segment(service_id)}")

    async def pass_ttl(self, check_id: str, note: str = "") -> None:
        """The TTL check ``check_id`` is passing, and its TTL starts over."""
        await self._ttl("pass", check_id, note)

    async def fail_ttl(self, check_id: str, note: str = "") -> None:
        """The TTL check ``check_id`` is critical (its container is not healthy)."""
        await self._ttl("fail", check_id, note)

    async def _ttl(self, verb: str, check_id: str, note: str) -> None:
        params = {"note": note} if note else None
        await self._call("PUT", f"/v1/agent/check/{verb}/{_segment(check_id)}", params=params)

    # ---------------------------------------------------------------------------- reads

    async def services(self, index: int = 0,
                       wait: float = DEFAULT_WAIT) -> tuple[int, tuple[str, ...]]:
        """The names of the catalog's services, once its index has moved past ``index``.

        Index 0 answers at once; otherwise the query hangs until a change or ``wait``
        seconds. Returns the index to pass next time (see ``convert.blocking_index``).
        """
        path = "/v1/catalog/services"
        headers, body = await self._call("GET", path, params=self._read(index, wait),
                                         blocking=wait if index else None)
        try:
            return convert.blocking_index(headers.get("X-Consul-Index"), index), \
                convert.service_names(body)
        except ValueError as err:
            raise self._invalid(path, err) from None

    async def healthy(self, name: str, index: int = 0, wait: float = DEFAULT_WAIT,
                      ) -> tuple[int, tuple[CatalogInstance, ...]]:
        """The instances of service ``name`` whose checks all pass, as a blocking query."""
        path = f"/v1/health/service/{_segment(name)}"
        params = self._read(index, wait)
        params["passing"] = "true"
        headers, body = await self._call("GET", path, params=params,
                                         blocking=wait if index else None)
        try:
            next_index = convert.blocking_index(headers.get("X-Consul-Index"), index)
            instances, problems = convert.health_instances(body)
        except ValueError as err:
            raise self._invalid(path, err) from None
        for problem in problems:
            log.warning("Consul at %s: %s of service %r left out: %s",
                        self.settings.address, problem.split(":", 1)[0], name,
                        problem.split(": ", 1)[-1])
        return next_index, instances

    def _read(self, index: int, wait: float) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.settings.datacenter:
            params["dc"] = self.settings.datacenter
        if index:
            params["index"] = str(index)
            params["wait"] = f"{round(min(wait, MAX_WAIT) * 1000)}ms"
        return params

    # ----------------------------------------------------------------------------- HTTP

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"X-Consul-Token": self.settings.token} if self.settings.token else {}
            # No limit on connections: each blocking query holds one for its wait, one per
            # watched service, and a registration must never queue behind them. (Consul
            # allows 200 per client address by default: limits.http_max_conns_per_client.)
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    body: object = None, blocking: float | None = None,
                    ) -> tuple[dict[str, str], Any]:
        """One request; the answer's headers and decoded JSON body (None if empty)."""
        address = self.settings.address
        # A blocking query may hang for its wait plus Consul's jitter of up to wait/16.
        limit = self.timeout + (blocking + blocking / 16 if blocking else 0.0)
        url = f"{address}{path}"
        try:
            async with self._session_for_loop().request(
                method, url, params=params, timeout=aiohttp.ClientTimeout(total=limit),
                data=None if body is None else json.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
            ) as response:
                status = response.status
                raw = await response.read()
                headers = dict(response.headers)
        except TimeoutError:
            raise ConsulError(f"Consul at {address} did not answer {method} {path} within "
                              f"{limit:g}s", kind="unreachable") from None
        except (aiohttp.ClientError, OSError) as err:
            raise ConsulError(f"Consul at {address} is unreachable: {_reason(err)}",
                              kind="unreachable") from None
        if status == 403:
            hint = "" if self.settings.token else (
                "; no token is set (x-composemesh.consul.token_file or CONSUL_HTTP_TOKEN)")
            raise ConsulError(f"the Consul token is refused (ACL): {_first_line(raw)}{hint}",
                              kind="acl", status=status)
        if status != 200:
            raise ConsulError(f"Consul at {address} answered {status} to {method} {path}: "
                              f"{_first_line(raw)}", kind="status", status=status)
        if not raw.strip():
            return headers, None
        try:
            return headers, json.loads(raw)
        except ValueError:
            raise self._invalid(path, ValueError("the body is not JSON")) from None

    def _invalid(self, path: str, err: ValueError) -> ConsulError:
        return ConsulError(f"Consul at {self.settings.address} answered {path} with what its "
                           f"API does not document: {err}", kind="invalid")


def _segment(value: str) -> str:
    """``value`` as one path segment (a service ID may hold ``/``, ``@`` or ``:``)."""
    return quote(value, safe="")


def _first_line(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text.splitlines()[0].strip() if text else "(no body)"


def _reason(err: BaseException) -> str:
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
