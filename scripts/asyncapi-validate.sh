#!/usr/bin/env bash
# Validates docs/asyncapi.yaml (or the given file) with the official AsyncAPI parser.
#
# The parser is pinned in scripts/asyncapi/package.json + package-lock.json and installed
# with `npm ci --ignore-scripts` from the npm registry into .cache/node (override with
# ASYNCAPI_NODE_PREFIX). The install is skipped while the lock file is unchanged.
#
# Usage: scripts/asyncapi-validate.sh [--dump-payloads] [FILE]
#   --dump-payloads  also print the parsed document's message payloads as JSON on stdout
# Exit status: 0 valid; 1 the parser reported errors or warnings; 2 tooling problem.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pins="$repo/scripts/asyncapi"
prefix=${ASYNCAPI_NODE_PREFIX:-"$repo/.cache/node"}

flags=()
spec="$repo/docs/asyncapi.yaml"
for arg in "$@"; do
    case "$arg" in
        --dump-payloads) flags+=("$arg") ;;
        -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "asyncapi-validate: unknown option $arg" >&2; exit 2 ;;
        *) spec=$arg ;;
    esac
done

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "asyncapi-validate: '$tool' not found. Install Node.js >= 18 with npm" \
            "(Debian: apt-get install nodejs npm) to validate the AsyncAPI document." >&2
        exit 2
    fi
done

start=$(date +%s%N)
want=$(cat "$pins/package.json" "$pins/package-lock.json" | sha256sum | cut -d' ' -f1)
stamp="$prefix/.pins.sha256"

install_parser() {
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" \
        && -f "$prefix/node_modules/@asyncapi/parser/package.json" ]]; then
        return 0
    fi
    echo "asyncapi-validate: installing the pinned AsyncAPI parser into $prefix" >&2
    local tmp
    tmp=$(mktemp -d "$prefix.tmp.XXXXXX")
    cp "$pins/package.json" "$pins/package-lock.json" "$tmp/"
    if ! (cd "$tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
        rm -rf "$tmp"
        echo "asyncapi-validate: npm ci failed (is the npm registry reachable?)" >&2
        exit 2
    fi
    echo "$want" >"$tmp/.pins.sha256"
    rm -rf "$prefix"
    mv "$tmp" "$prefix"
}

mkdir -p "$(dirname "$prefix")"
if command -v flock >/dev/null 2>&1; then
    # Serialise concurrent runs (parallel test workers) around the install.
    exec 9>"$prefix.lock"
    flock 9
    install_parser
    flock -u 9
else
    install_parser
fi

status=0
node "$pins/validate.cjs" "$prefix" "$spec" "${flags[@]}" || status=$?
ms=$((($(date +%s%N) - start) / 1000000))
printf 'asyncapi-validate: %s in %d.%03ds\n' \
    "$([[ $status -eq 0 ]] && echo passed || echo FAILED)" $((ms / 1000)) $((ms % 1000)) >&2
exit "$status"
