"""Fixed names of the mesh: ports, label keys, roles, and how injected services are named."""

from __future__ import annotations

from typing import Final

from composemesh import __version__

# Ports inside every proxy's network namespace (Istio's, on purpose).
PORT_ADMIN: Final = 15000  # config dump, ready, stats
PORT_OUTBOUND: Final = 15001  # outbound capture (iptables REDIRECT target)
PORT_INBOUND: Final = 15006  # inbound capture (iptables REDIRECT target)
# The pilot's API listens on no port: it is on a Unix socket in a volume that only the mesh's
# own containers mount (the proxies read-only); callers are attested by the kernel.
PILOT_SOCKET_DIR: Final = "/run/composemesh"
PILOT_SOCKET: Final = f"{PILOT_SOCKET_DIR}/pilot.sock"
PILOT_URL: Final = f"unix://{PILOT_SOCKET}"  # how a proxy names it (COMPOSEMESH_PILOT_URL)
# Its one network port: the read-only monitoring listener (Istio's istiod port), serving
# /metrics and /sd/prometheus only (pilot.monitoring).
PORT_PILOT_MONITORING: Final = 15014
PORT_HEALTH: Final = 15021  # /healthz/ready
PORT_PROMETHEUS: Final = 15090  # /stats/prometheus
PROXY_PORTS: Final = (PORT_ADMIN, PORT_OUTBOUND, PORT_INBOUND, PORT_HEALTH, PORT_PROMETHEUS)

# The proxy runs as this uid; iptables lets its own traffic through uncaptured.
PROXY_UID: Final = 1337

# Image every injected container runs; the role is the command.
MESH_IMAGE: Final = f"composemesh:{__version__}"
DEMO_IMAGE: Final = f"composemesh-demo:{__version__}"
# The monitoring add-on's Prometheus, built offline from Debian's `prometheus` package
PROMETHEUS_IMAGE: Final = f"composemesh-prometheus:{__version__}"

# Label keys a user sets on a compose service.
LABEL_PREFIX: Final = "composemesh."
LABEL_ENABLE: Final = "composemesh.enable"
LABEL_SERVICE: Final = "composemesh.service"
LABEL_VERSION: Final = "composemesh.version"
LABEL_WEIGHT: Final = "composemesh.weight"
LABEL_PROTOCOL: Final = "composemesh.protocol"
LABEL_PORT_PREFIX: Final = "composemesh.port."  # composemesh.port.<N>.protocol
# one route of the ingress gateway to this service (x-composemesh.gateways: the long form)
LABEL_INGRESS_HOST: Final = "composemesh.ingress.host"
LABEL_INGRESS_PATH: Final = "composemesh.ingress.path"
LABEL_INGRESS_PORT: Final = "composemesh.ingress.port"
LABEL_GATEWAY: Final = "composemesh.gateway"  # on the gateways' own containers: ingress

# Label keys the injector sets on what it adds.
LABEL_ROLE: Final = "composemesh.role"  # netns | proxy | pilot
LABEL_OF: Final = "composemesh.of"  # the compose service an injected container serves
LABEL_INSTANCE: Final = "composemesh.instance"  # 1..N for an expanded replicated service

ROLE_NETNS: Final = "netns"
ROLE_PROXY: Final = "proxy"
ROLE_PILOT: Final = "pilot"

PILOT_SERVICE: Final = "composemesh-pilot"
INGRESS_GATEWAY: Final = "ingress-gateway"  # the gateways' mesh (and compose) service names
EGRESS_GATEWAY: Final = "egress-gateway"
GATEWAY_INGRESS: Final = "ingress"  # the value of LABEL_GATEWAY and of ENV_GATEWAY
ENV_GATEWAY: Final = "COMPOSEMESH_GATEWAY"  # the proxy's role, if a gateway's
ENV_INGRESS: Final = "COMPOSEMESH_INGRESS"  # the pilot's copy of the resolved ingress (JSON)
INGRESS_HTTP_PORT: Final = 8080  # where the ingress gateway listens, in its own namespace
INGRESS_HTTPS_PORT: Final = 8443
ENV_EXCLUDE_INBOUND: Final = "COMPOSEMESH_EXCLUDE_INBOUND_PORTS"  # the holder's: not captured
ENV_EXCLUDE_OUTBOUND: Final = "COMPOSEMESH_EXCLUDE_OUTBOUND_PORTS"
EGRESS_PORT: Final = 15443  # the egress gateway's mTLS listener, for the sidecars' calls
EGRESS_FILES_DIR: Final = "/etc/composemesh/egress"  # <n>/ca.pem, tls.crt, tls.key
EGRESS_VIP_NETWORK: Final = "240.240.0.0/16"  # the listed hosts' names, in every namespace
GATEWAY_EGRESS: Final = "egress"
# The east-west gateway (x-composemesh.consul): other hosts' sidecars reach this project's
# through it, by SNI, the TLS passed through (model.east_west).
EAST_WEST_GATEWAY: Final = "east-west-gateway"
GATEWAY_EAST_WEST: Final = "east-west"
PORT_EAST_WEST: Final = 15443  # where it listens in its own namespace (published as east_west_port)
# Where the injector mounts x-composemesh.consul.token_file in the pilot, read-only (the
# pilot's copy of the section names it; the meshed file never holds the token itself).
PILOT_CONSUL_TOKEN: Final = "/run/secrets/composemesh-consul-token"
# Each sidecar answers the app's DNS queries for imported names (iptables sends the app's
# UDP to 127.0.0.11:53 here) and passes every other query on to Docker's DNS.
PORT_DNS: Final = 15053
ENV_CAPTURE_DNS: Final = "COMPOSEMESH_CAPTURE_DNS"  # a holder's: "true" in a federated mesh
ENV_LOCAL_NAMES: Final = "COMPOSEMESH_LOCAL_NAMES"  # the pilot's: names the project's DNS has
DOCKER_DNS: Final = "127.0.0.11"
ENV_EGRESS: Final = "COMPOSEMESH_EGRESS"  # the pilot's copy of the resolved egress (JSON)
INGRESS_CERT_DIR: Final = "/etc/composemesh/ingress"  # <host>/tls.crt and tls.key, read-only
# The monitoring add-on (x-composemesh.monitoring): not meshed, no sidecars of their own.
PROMETHEUS_SERVICE: Final = "composemesh-prometheus"
GRAFANA_SERVICE: Final = "composemesh-grafana"
ROLE_PROMETHEUS: Final = "prometheus"  # their LABEL_ROLE
ROLE_GRAFANA: Final = "grafana"
PORT_PROMETHEUS_UI: Final = 9090  # where each listens in its own container
PORT_GRAFANA_UI: Final = 3000
GRAFANA_PROFILE: Final = "grafana"  # the compose profile Grafana is in: `up` enables it
DEFAULT_VERSION: Final = "v1"
DEFAULT_TRUST_DOMAIN: Final = "cluster.local"


def netns_service(app_service: str) -> str:
    """The compose service that owns the network namespace of ``app_service``."""
    return f"{app_service}-netns"


def proxy_service(app_service: str) -> str:
    """The compose service of the sidecar proxy of ``app_service``."""
    return f"{app_service}-proxy"


def instance_service(app_service: str, index: int) -> str:
    """The compose service of instance ``index`` (1-based) of a replicated service."""
    return app_service if index == 1 else f"{app_service}-{index}"
