# The composemesh image: pilot, proxy and gateway in one; the role is the command.
# Built by composemesh/engine/images.py with the classic builder (docker SDK) and, when the
# base has what it needs, no network at all: everything Python comes from the wheelhouse in
# the build context (deps/: the dependencies' wheels and requirements.txt; app/: the
# composemesh wheel). BASE is composemesh-base:bookworm or the configured base image.
ARG BASE=composemesh-base:bookworm

FROM ${BASE} AS venv
# The dependencies first, in their own layer: a change of composemesh's sources alone reuses it.
# image_cache.py tags that layer composemesh-build-cache:deps and removes the rest of this stage
# (found by this label) after the build.
LABEL composemesh.build-cache=venv
COPY deps/ /wheels/deps/
RUN set -e; \
    python3 -m venv /opt/composemesh; \
    /opt/composemesh/bin/python -m pip install --no-index --find-links /wheels/deps \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location --quiet \
        -r /wheels/deps/requirements.txt
COPY app/ /wheels/app/
RUN set -e; \
    /opt/composemesh/bin/python -m pip install --no-index \
        --find-links /wheels/app --find-links /wheels/deps \
        --no-cache-dir --disable-pip-version-check --no-warn-script-location --quiet composemesh; \
    /opt/composemesh/bin/python -m pip uninstall --yes --quiet --disable-pip-version-check \
        pip setuptools; \
    /opt/composemesh/bin/python -c "import composemesh"

FROM ${BASE}
ARG PROXY_UID=1337
# iptables sets up the capture rules; useradd creates the proxy's user. A base without them
# gets them from apt, which needs a network: say so plainly when there is none.
RUN set -e; \
    missing=""; \
    for c in iptables useradd groupadd; do \
        command -v "$c" >/dev/null 2>&1 || missing="$missing $c"; \
    done; \
    if [ -n "$missing" ]; then \
        if command -v apt-get >/dev/null 2>&1 \
           && apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                iptables passwd iproute2 >/dev/null; then \
            rm -rf /var/lib/apt/lists/*; \
        else \
            echo "composemesh: the base image lacks$missing and apt cannot install it here (no network?); use a base that has iptables (COMPOSEMESH_BASE_IMAGE) or unset COMPOSEMESH_BASE_IMAGE to let composemesh build its own" >&2; \
            exit 1; \
        fi; \
    fi; \
    getent group "$PROXY_UID" >/dev/null || groupadd --gid "$PROXY_UID" composemesh-proxy; \
    getent passwd "$PROXY_UID" >/dev/null || useradd --uid "$PROXY_UID" --gid "$PROXY_UID" \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --comment "composemesh proxy" composemesh-proxy
COPY --from=venv /opt/composemesh /opt/composemesh
RUN ln -sf /opt/composemesh/bin/composemesh /usr/local/bin/composemesh
# `python` and `python3` are the venv's: composemesh and its dependencies import as is.
ENV PATH="/opt/composemesh/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
CMD ["composemesh", "--help"]
