#!/usr/bin/env bash
# Generates Grafana's dashboard schema as JSON Schema (draft-07) for tests/dashboards, once per
# set of pinned versions, and prints the directory that holds it.
#
# Source: Grafana's own npm packages, whose TypeScript types Grafana generates from its CUE
# kinds (tests/dashboards/README.md): the dashboard kind and the panel plugins' panelcfg from
# @grafana/schema, the Prometheus query from @grafana/prometheus (whose one import it needs,
# Scope, is in @grafana/data). Those three are fetched as tarballs (`npm pack`, no dependency
# tree); the generator, ts-json-schema-generator, and its TypeScript are `npm install`ed.
# Nothing here is committed: it all lives in the cache directory.
#
# Output, in $CACHE/<key>/:
#   dashboard.schema.json   the Dashboard type ($ref: #/definitions/Dashboard)
#   prometheus.schema.json  the Prometheus query type ($ref: #/definitions/Prometheus)
#   timeseries.schema.json, stat.schema.json, table.schema.json
#                           every exported type of the panel's panelcfg (Options, FieldConfig)
#   manifest.json           versions, sources (with sha256) and the generator's flags
#
# Usage: scripts/grafana-schema.sh [--check]   (--check: print the directory if it is
# complete, else exit 1; never installs anything). Exit 3: npm is not installed.
# Env: COMPOSEMESH_GRAFANA_SCHEMA_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/composemesh/grafana-schema).
set -euo pipefail

GRAFANA_VERSION=11.3.0
GENERATOR_VERSION=2.3.0   # the last with engines node >= 18 (Debian 12's nodejs); 2.5+ need 22
TYPESCRIPT_VERSION=5.7.3  # within the generator's ^5.4.5
KEY=grafana-$GRAFANA_VERSION+ts-json-schema-generator-$GENERATOR_VERSION+typescript-$TYPESCRIPT_VERSION
CACHE=${COMPOSEMESH_GRAFANA_SCHEMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/composemesh/grafana-schema}
OUT=$CACHE/$KEY
FILES=(dashboard prometheus timeseries stat table)

note() { printf 'grafana-schema: %s\n' "$*" >&2; }

complete() {
    [ -f "$OUT/manifest.json" ] || return 1
    local name
    for name in "${FILES[@]}"; do [ -s "$OUT/$name.schema.json" ] || return 1; done
}

if complete; then echo "$OUT"; exit 0; fi
if [ "${1:-}" = --check ]; then exit 1; fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    note "npm and node are needed (apt-get install npm)"
    exit 3
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
note "generating into $OUT (npm: @grafana/schema, @grafana/prometheus, @grafana/data $GRAFANA_VERSION; ts-json-schema-generator $GENERATOR_VERSION)"

cd "$WORK"
cat >package.json <<EOF
{"name": "composemesh-grafana-schema", "private": true,
 "dependencies": {"ts-json-schema-generator": "$GENERATOR_VERSION", "typescript": "$TYPESCRIPT_VERSION"}}
EOF
npm install --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null
mkdir -p tarballs
for pkg in schema prometheus data; do
    (cd tarballs && npm pack --silent --loglevel=error "@grafana/$pkg@$GRAFANA_VERSION" >/dev/null)
    mkdir -p "node_modules/@grafana/$pkg"
    tar -xzf "tarballs/grafana-$pkg-$GRAFANA_VERSION.tgz" -C "node_modules/@grafana/$pkg" \
        --strip-components=1
done

GEN=(node node_modules/ts-json-schema-generator/bin/ts-json-schema-generator
     --no-type-check --no-ref-encode)
RAW=node_modules/@grafana/schema/dist/esm/raw
declare -A SOURCE=(
    [dashboard]=$RAW/dashboard/x/dashboard_types.gen.d.ts
    [timeseries]=$RAW/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.d.ts
    [stat]=$RAW/composable/stat/panelcfg/x/StatPanelCfg_types.gen.d.ts
    [table]=$RAW/composable/table/panelcfg/x/TablePanelCfg_types.gen.d.ts
    [prometheus]=node_modules/@grafana/prometheus/dist/index.d.ts
)
declare -A TYPE=([dashboard]=Dashboard [timeseries]='*' [stat]='*' [table]='*' [prometheus]=Prometheus)
# @grafana/prometheus exports its types from one bundled index.d.ts in an `export { type ... }`
# list, which the generator finds only with --expose all.
declare -A EXTRA=([prometheus]='--expose all')
mkdir -p out
for name in "${FILES[@]}"; do
    # shellcheck disable=SC2086
    "${GEN[@]}" --path "${SOURCE[$name]}" --type "${TYPE[$name]}" ${EXTRA[$name]:-} \
        -o "out/$name.schema.json"
done

SOURCES=$(for name in "${FILES[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "${SOURCE[$name]#node_modules/}" "${TYPE[$name]}" \
        "${EXTRA[$name]:-}" "$(sha256sum "${SOURCE[$name]}" | cut -d' ' -f1)"
done)
RESOLVED=$(npm ls --all --json 2>/dev/null || true)
SECONDS_TAKEN=$(( $(date +%s) - started ))
export GRAFANA_VERSION GENERATOR_VERSION TYPESCRIPT_VERSION SOURCES RESOLVED SECONDS_TAKEN
node -e '
const e = process.env, deps = {};
const walk = (d) => { for (const [n, v] of Object.entries(d.dependencies || {})) { deps[n] = v.version; walk(v); } };
try { walk(JSON.parse(e.RESOLVED)); } catch (err) {}
const sources = {};
for (const line of e.SOURCES.trim().split("\n")) {
  const [name, file, type, extra, sha256] = line.split("\t");
  sources[name] = {file, type, flags: ["--no-type-check", "--no-ref-encode"].concat(extra ? extra.split(" ") : []), sha256};
}
const manifest = {
  grafana: {packages: ["@grafana/schema", "@grafana/prometheus", "@grafana/data"], version: e.GRAFANA_VERSION},
  generator: {name: "ts-json-schema-generator", version: e.GENERATOR_VERSION, typescript: e.TYPESCRIPT_VERSION, node: process.version},
  generator_dependencies: deps, sources, seconds: Number(e.SECONDS_TAKEN),
};
require("fs").writeFileSync("out/manifest.json", JSON.stringify(manifest, null, 2) + "\n");
'

if ! complete; then   # else a concurrent run got there first
    rm -rf "$OUT"       # an incomplete one
    mv -T out "$OUT"
fi
note "done in ${SECONDS_TAKEN}s"
echo "$OUT"
