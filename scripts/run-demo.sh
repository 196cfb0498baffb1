#!/usr/bin/env bash
# `make run`: Kafka, the API simulator with demo batches, the service, and the events
# as they arrive. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export KAFKA_PORT="${KAFKA_PORT:-9092}"
SIM_PORT="${SIM_PORT:-8099}"
HTTP_PORT="${HTTP_PORT:-8080}"
RUN_DIR=.run/demo
mkdir -p "$RUN_DIR"

pids=()
kafka_started=0
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "== stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$kafka_started" = 1 ]; then scripts/kafka.sh stop; fi
  echo "== stopped"
  exit 0
}
trap cleanup INT TERM EXIT

echo "== Kafka on 127.0.0.1:$KAFKA_PORT"
if ! scripts/kafka.sh status >/dev/null 2>&1; then
  scripts/kafka.sh start
  kafka_started=1
fi

echo "== Rightfoot API simulator on 127.0.0.1:$SIM_PORT (demo batches, records appear over 2 minutes)"
uv run --frozen rightfoot-poller simulate --port "$SIM_PORT" --api-key demo-key \
  >"$RUN_DIR/simulator.log" 2>&1 &
pids+=($!)

# The demo's own settings, by environment: the documented config.yaml, pointed at the
# simulator and the local broker, with a shorter polling window so that things move.
export RIGHTFOOT_API_KEY=demo-key
export RFP_HTTP__ADMIN_TOKEN=demo-admin-token
export RFP_INSTANCE_ID=demo-1
export RFP_RIGHTFOOT__BASE_URL="http://127.0.0.1:$SIM_PORT"
export RFP_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT"
export RFP_KAFKA__PARTITIONS=3
export RFP_HTTP__PORT="$HTTP_PORT"
export RFP_POLLING__INTERVAL_MIN_S="${RFP_POLLING__INTERVAL_MIN_S:-10}"
export RFP_POLLING__INTERVAL_MAX_S="${RFP_POLLING__INTERVAL_MAX_S:-20}"
export RFP_POLLING__NOT_FOUND_GRACE_S="${RFP_POLLING__NOT_FOUND_GRACE_S:-60}"
export RFP_POLLING__COMPLETE_AFTER_IDLE_S="${RFP_POLLING__COMPLETE_AFTER_IDLE_S:-60}"

echo "== rightfoot-poller on :$HTTP_PORT (logs: $RUN_DIR/service.log)"
uv run --frozen rightfoot-poller run --config config.yaml >"$RUN_DIR/service.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { echo "service not ready"; tail -20 "$RUN_DIR/service.log"; exit 1; }

echo "== tracking the demo batches"
# Door 1, the CLI:
uv run --frozen rightfoot-poller track 5d3c6bbb-fc1a-46a4-93da-1ce4a54b0d83 --expected-count 14 --config config.yaml
uv run --frozen rightfoot-poller track 6a1d2c3b-4e5f-4a6b-8c7d-000000001250 --expected-count 1250 --config config.yaml
# Door 2, the admin API:
for batch in 7b2e3d4c-5f6a-4b7c-9d8e-000000000020 8c3f4e5d-6a7b-4c8d-ae9f-000000000004 00000000-0000-4000-8000-000000000404; do
  curl -fsS -X POST "http://127.0.0.1:$HTTP_PORT/v1/batches" \
    -H "Authorization: Bearer $RFP_HTTP__ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d "{\"batch_id\": \"$batch\"}"
  echo
done

echo "== lifecycle and balance events as they arrive (read_committed); Ctrl-C to stop"
echo "   tracked batches: curl -s localhost:$HTTP_PORT/v1/batches   metrics: curl -s localhost:$HTTP_PORT/metrics"
uv run --frozen python scripts/tail_events.py --bootstrap-servers "127.0.0.1:$KAFKA_PORT" \
  rightfoot.batch-events rightfoot.balances &
pids+=($!)
wait
