#!/usr/bin/env bash
# Build Benthos 4.27.0 (MIT, the last release before the relicensing) for the benchmark's
# peer (bench/benthos.yaml): the small distribution in scripts/benthos/ (only the pure, io,
# kafka and prometheus components), from the Go module proxy, into
# .cache/benthos/benthos-4.27.0 if it is not there yet (~1-3 min the first time).
# Prints the binary's path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${BENTHOS_BIN:-$root/.cache/benthos/benthos-4.27.0}"
if [[ ! -x "$out" ]]; then
  command -v go >/dev/null || { echo "benthos.sh: go is needed to build Benthos" >&2; exit 1; }
  mkdir -p "$(dirname "$out")"
  # One build at a time: a second caller (the test suite starts one early, in the
  # background) waits for it and then finds the binary.
  exec 9>"$out.lock"
  flock 9
  if [[ ! -x "$out" ]]; then
    echo "benthos.sh: building Benthos 4.27.0 into $out" >&2
    (cd "$root/scripts/benthos" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
      go build -trimpath -o "$out.tmp" .)
    mv "$out.tmp" "$out"
  fi
fi
echo "$out"
