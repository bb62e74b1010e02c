#!/usr/bin/env bash
# Command two of the README (and what .ci/run calls): install what the tests need, run them all.
# A dockerd that this script had to start is stopped again at the end; one that was already
# running (say, for the example mesh) is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

engine_was_up=0
if docker info >/dev/null 2>&1; then engine_was_up=1; fi

bash scripts/bootstrap.sh

cleanup() {
    # containers, networks and volumes of test projects that a killed run may have left
    for p in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' 2>/dev/null \
               | grep '^cmtest-' | sort -u); do
        docker ps -aq --filter "label=com.docker.compose.project=$p" | xargs -r docker rm -f -v >/dev/null
        docker network ls -q --filter "label=com.docker.compose.project=$p" | xargs -r docker network rm >/dev/null
        docker volume ls -q --filter "label=com.docker.compose.project=$p" | xargs -r docker volume rm -f >/dev/null
    done
    if [ "$engine_was_up" = 0 ]; then bash scripts/dockerd.sh stop; fi
}
trap cleanup EXIT

export TESTCONTAINERS_RYUK_DISABLED=true
set +e
.venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "no tests ran: that is a failure"; code=1; fi
exit "$code"
