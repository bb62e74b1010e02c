# The monitoring add-on's Prometheus (x-composemesh.monitoring.prometheus): Debian bookworm's
# `prometheus` package on the composemesh base. Built by composemesh/engine/images.py with no
# network at all: debs/ holds the package and the dependencies the base lacks, downloaded on
# the host with apt (composemesh/engine/prometheus_image.py). Runs as the package's own
# `prometheus` user; its data is the volume at /prometheus.
ARG BASE=composemesh-base:bookworm
FROM ${BASE}
COPY debs/ /tmp/debs/
# policy-rc.d: the package's maintainer scripts start no service in a build. The timezone
# data of moment-timezone (200 MB of JSON the web UI never loads) is left out.
RUN set -e; \
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
    chmod +x /usr/sbin/policy-rc.d; \
    DEBIAN_FRONTEND=noninteractive dpkg --install --force-confold \
        --path-exclude='/usr/share/javascript/moment-timezone/data/*' /tmp/debs/*.deb; \
    rm -rf /tmp/debs /usr/sbin/policy-rc.d /var/log/*.log; \
    mkdir -p /prometheus; \
    chown prometheus:prometheus /prometheus; \
    /usr/bin/prometheus --version
USER prometheus
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
