# ---------------------------------------------------------------------------
# Local Kafka (single-node KRaft broker from Maven Central, see scripts/kafka.sh)
# Settings: KAFKA_PORT (9092), KAFKA_DIR, KAFKA_HEAP, KAFKA_KEEP_DATA=1, ...
# ---------------------------------------------------------------------------
.PHONY: tools-uv kafka-start kafka-stop kafka-status tools-kcat

# uv from PATH; installed with pip when missing (the readiness check runs in the uv venv).
# A Debian system python refuses plain pip (PEP 668): fall back to a user install,
# whose bin dir is added to PATH for the targets that need uv.
UV_PATH := $(PATH):$(HOME)/.local/bin
tools-uv kafka-start kafka-status: export PATH := $(UV_PATH)
tools-uv:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv==0.13.8 || \
	  python3 -m pip install --quiet --user --break-system-packages uv==0.13.8

# Start the broker (idempotent) and wait until it serves transactions and groups.
kafka-start: tools-uv
	scripts/kafka.sh start

# Stop the broker started from KAFKA_DIR (idempotent).
kafka-stop:
	scripts/kafka.sh stop

# Exit 0 if a broker answers on KAFKA_PORT and is ready.
kafka-status: tools-uv
	scripts/kafka.sh status

# kcat (Debian package) to inspect topics, e.g. kcat -b 127.0.0.1:9092 -L
tools-kcat:
	@command -v kcat >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat; }

# ---------------------------------------------------------------------------
# Event format: validate docs/asyncapi.yaml (and its examples) with the official
# AsyncAPI parser, pinned in scripts/asyncapi/ and installed into .cache/node by npm.
# ---------------------------------------------------------------------------
.PHONY: asyncapi
asyncapi:
	scripts/asyncapi-validate.sh
