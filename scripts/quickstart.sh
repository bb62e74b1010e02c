#!/usr/bin/env bash
# Command one of the README: set everything up on this machine and bring the example mesh up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/composemesh up -f examples/bookinfo/compose.yaml "$@"
