#!/usr/bin/env bash
# The whole suite as three pytest sessions at once: the tests that need no broker (CPU-bound,
# about a minute and a half), and those against a real Kafka in two halves (the fault
# injection suites, and the rest), which mostly wait on the broker and the clock. The two
# halves share one broker, started here first (the one test that restarts a broker runs
# its own). Exits non-zero if any session fails; extra arguments go to all three (a
# session that they leave without a test counts as passed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .run
# The benchmark smoke test needs Benthos (bench/peer.py); on a fresh machine its build takes
# minutes. Start it now, at low priority, so that it overlaps the other tests instead of
# holding up that one (scripts/benthos.sh lets one build run at a time).
nice -n 10 scripts/benthos.sh >/dev/null 2>.run/benthos-build.log &

export KAFKA_TEST_PORT="${KAFKA_TEST_PORT:-19092}"
broker() { KAFKA_PORT="$KAFKA_TEST_PORT" scripts/kafka.sh "$@"; }
started_broker=0
if ! broker status >/dev/null 2>&1; then
  broker start || { echo "cannot start Kafka on port $KAFKA_TEST_PORT" >&2; exit 1; }
  started_broker=1
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  if [ "$started_broker" -eq 1 ]; then broker stop >/dev/null 2>&1; fi
}
trap cleanup EXIT

names=("tests without a broker" "Kafka tests: fault injection" "Kafka tests: the rest")
marks=("not kafka" "kafka and faults" "kafka and not faults")
logs=(.run/tests-without-broker.log .run/tests-kafka-faults.log .run/tests-kafka-rest.log)
for i in 0 1 2; do
  uv run --frozen pytest -q -m "${marks[$i]}" -p no:cacheprovider "$@" >"${logs[$i]}" 2>&1 &
  pids+=($!)
done

failed=0
for i in 0 1 2; do
  wait "${pids[$i]}"
  rc=$?
  echo "== ${names[$i]} (pytest -m '${marks[$i]}', log in ${logs[$i]}):"
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]; then
    tail -n 1 "${logs[$i]}"
  else
    cat "${logs[$i]}"
    failed=1
  fi
done
pids=()
exit "$failed"
