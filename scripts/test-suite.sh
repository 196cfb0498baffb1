#!/usr/bin/env bash
# The whole suite as two pytest sessions at once: the tests that need no broker (CPU-bound,
# about a minute and a half) beside those against a real Kafka (which mostly wait on the
# broker and the clock). Exits non-zero if either fails; extra arguments go to both.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .run
# The benchmark smoke test needs Benthos (bench/peer.py); on a fresh machine its build takes
# minutes. Start it now, at low priority, so that it overlaps the other tests instead of
# holding up that one (scripts/benthos.sh lets one build run at a time).
nice -n 10 scripts/benthos.sh >/dev/null 2>.run/benthos-build.log &
log=.run/tests-without-broker.log
uv run --frozen pytest -q -m "not kafka" -p no:cacheprovider "$@" >"$log" 2>&1 &
unit=$!
trap 'kill "$unit" 2>/dev/null' EXIT
uv run --frozen pytest -q -m kafka "$@"
kafka_rc=$?
wait "$unit"
unit_rc=$?
trap - EXIT
echo "== tests without a broker (pytest -m 'not kafka', log in $log):"
if [ "$unit_rc" -eq 0 ]; then tail -n 1 "$log"; else cat "$log"; fi
[ "$kafka_rc" -eq 0 ] && [ "$unit_rc" -eq 0 ]
