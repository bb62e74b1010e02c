"""The pilot's read-only monitoring listener (TCP 15014, Istio's istiod monitoring port).

It serves exactly two things, to anyone on the pilot's networks:

- ``GET /metrics``: the pilot's own metrics (``pilot.metrics``), in the exposition format the
  ``Accept`` header asks for (Prometheus text, or OpenMetrics);
- ``GET /sd/prometheus``: Prometheus HTTP service discovery (``http_sd_configs``): one target
  group per running workload's proxy (its ``:15090/stats/prometheus``) and one for the pilot
  itself, computed from the mesh state at each request (``sd_targets``, pure).

Any other path is 404 and any other method on these 405. Nothing here changes the mesh or
shows a secret: no certificate, no key, no token, no setting; the handlers read the metrics
registry and the workloads' names and addresses only, and share nothing with the API on the
Unix socket (``pilot.server``). Request lines and header fields are capped (431 or 400 past
them) and no body is read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from composemesh.model import wellknown as wk
from composemesh.model.mesh import MeshState, Workload
from composemesh.pilot.metrics import PilotMetrics
from composemesh.pilot.traffic import host_port, metrics_address

METRICS_PATH = "/metrics"
SD_PATH = "/sd/prometheus"
PROXY_METRICS_PATH = "/stats/prometheus"
# The pilot as Prometheus reaches it: by its compose service name, on any network they share.
PILOT_TARGET = f"{wk.PILOT_SERVICE}:{wk.PORT_PILOT_MONITORING}"
# What one request may bring: a short request line, a few short headers, no body.
HANDLER_LIMITS = {
    "max_line_size": 4096,
    "max_field_size": 4096,
    "max_headers": 32,
    "keepalive_timeout": 15.0,
}
MAX_BODY = 1024


def proxy_role(workload: Workload) -> str:
    """What ``workload``'s proxy is: a gateway (by its fixed mesh service name) or a sidecar."""
    if workload.service in (wk.INGRESS_GATEWAY, wk.EGRESS_GATEWAY):
        return workload.service
    return "sidecar"


def sd_targets(state: MeshState, pilot_networks: Collection[str] | None = None,
               pilot_target: str = PILOT_TARGET) -> list[dict[str, object]]:
    """The Prometheus http_sd target groups for ``state``: each running workload's proxy
    (by node), at the address the pilot scrapes it at (``traffic.metrics_address``: on a
    network the pilot shares; a workload with none is left out), then the pilot itself."""
    groups: list[dict[str, object]] = []
    for w in sorted(state.workloads, key=lambda w: w.node):
        address = metrics_address(w, pilot_networks) if w.running else None
        if address is None:
            continue
        groups.append({
            "targets": [host_port(address, wk.PORT_PROMETHEUS)],
            "labels": {
                "__metrics_path__": PROXY_METRICS_PATH,
                "namespace": state.project,
                "workload": w.compose_service,
                "service": w.service,
                "version": w.version,
                "role": proxy_role(w),
            },
        })
    groups.append({
        "targets": [pilot_target],
        "labels": {"__metrics_path__": METRICS_PATH, "namespace": state.project,
                   "role": "pilot"},
    })
    return groups


def make_monitoring_app(
    metrics: PilotMetrics,
    state: Callable[[], MeshState],
    pilot_networks: Collection[str] | None = None,
    pilot_target: str = PILOT_TARGET,
) -> web.Application:
    """The monitoring listener's application: ``metrics``' registry, and the targets of
    ``state()`` (read at each request, so workloads that come and go show at once)."""

    async def get_metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry),
                            headers={"Content-Type": content_type})

    async def get_sd(request: web.Request) -> web.Response:
        return web.json_response(sd_targets(state(), pilot_networks, pilot_target))

    app = web.Application(client_max_size=MAX_BODY, handler_args=HANDLER_LIMITS)
    app.router.add_get(METRICS_PATH, get_metrics, allow_head=False)
    app.router.add_get(SD_PATH, get_sd, allow_head=False)
    return app


async def start_monitoring(app: web.Application, host: str | None = None,
                           port: int = wk.PORT_PILOT_MONITORING) -> web.AppRunner:
    """``app`` listening on ``port`` of ``host`` (None: every interface); OSError if it
    cannot bind (nothing is left running then)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
