# rightfoot-poller — the targets the README and CI use.
#   make run    Kafka + simulator + service + demo batches, events shown as they arrive
#   make test   everything CI checks: lint, types, unit, integration (real Kafka), deploy
SHELL := /bin/bash
UV_VERSION := 0.13.8
export PATH := $(CURDIR)/.cache/tools/bin:$(PATH):$(HOME)/.local/bin
UV := uv
export KAFKA_TEST_PORT ?= 19092

.PHONY: help install lint format typecheck unit test test-fast run bench clean

help:
	@grep -E '^[a-z-]+:.*' Makefile | sed 's/:.*//' | sort -u | tr '\n' ' '; echo

# The locked environment (.venv), with the dev tools.
install: tools-uv
	$(UV) sync --frozen

lint: install
	$(UV) run --frozen ruff check service rightfoot_simulator tests bench scripts examples
	$(UV) run --frozen ruff format --check service rightfoot_simulator tests bench scripts examples

format: install
	$(UV) run --frozen ruff format service rightfoot_simulator tests bench scripts examples
	$(UV) run --frozen ruff check --fix service rightfoot_simulator tests bench scripts examples

typecheck: install
	$(UV) run --frozen mypy service rightfoot_simulator tests

# Pure logic only; no broker needed.
unit: install
	$(UV) run --frozen pytest -m "not kafka" -q

# Everything: lint, types, then the whole suite in three sessions at once: those that need
# no broker, and those against a real broker (scripts/kafka.sh on $(KAFKA_TEST_PORT),
# started and stopped by scripts/test-suite.sh) in two halves.
test: lint typecheck tools
	scripts/test-suite.sh

run: install
	scripts/run-demo.sh

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache

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

# A three-node KRaft cluster (scripts/kafka.sh cluster mode): brokers on
# KAFKA_CLUSTER_PORT, +1, +2, controllers 1000 above; replication factor 3, min ISR 2.
# Lose and restore a broker with scripts/kafka.sh node-kill N / node-start N (KAFKA_PORT=
# $(KAFKA_CLUSTER_PORT)). tests/test_broker_loss.py starts its own on KAFKA_CLUSTER_TEST_PORT.
.PHONY: kafka-cluster-start kafka-cluster-stop kafka-cluster-status
KAFKA_CLUSTER_PORT ?= 9192
export KAFKA_CLUSTER_TEST_PORT ?= 61092
kafka-cluster-start kafka-cluster-status: export PATH := $(UV_PATH)

# Start the three nodes (idempotent) and wait until the cluster serves transactions and groups.
kafka-cluster-start: tools-uv
	KAFKA_PORT=$(KAFKA_CLUSTER_PORT) scripts/kafka.sh cluster-start

# Stop the three nodes (idempotent).
kafka-cluster-stop:
	KAFKA_PORT=$(KAFKA_CLUSTER_PORT) scripts/kafka.sh cluster-stop

# Each node's pid; exit 0 if all three brokers are up and the cluster is ready.
kafka-cluster-status: tools-uv
	KAFKA_PORT=$(KAFKA_CLUSTER_PORT) scripts/kafka.sh cluster-status

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

# ---------------------------------------------------------------------------
# Deployment artefacts: Dockerfile, helm chart, Prometheus alerts, Grafana dashboard.
# Tools (helm, kubeconform, promtool, hadolint, offline Kubernetes schemas) come from
# scripts/install-tools.sh into .cache/tools; tests/test_deploy.py checks all of it too.
# ---------------------------------------------------------------------------
.PHONY: tools lint-deploy sync-deploy-copies

DEPLOY_TOOLS := $(CURDIR)/.cache/tools/bin
DEPLOY_CHART := helm/rightfoot-poller
# Kubernetes versions the manifests are validated against (see scripts/install-tools.sh).
DEPLOY_KUBE_VERSIONS := 1.29.0 1.35.0
DEPLOY_SCHEMAS := $(CURDIR)/.cache/tools/kubernetes-json-schema/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json

# Install the deployment tools (idempotent; the first run builds helm, ~2-3 min).
# scripts/install-tools.sh runs uv: tools-uv installs it on a machine without it.
tools: tools-uv
	bash scripts/install-tools.sh

# Lint the Dockerfile; lint, render and schema-validate the chart with every ci/*-values.yaml
# (ServiceMonitor/PrometheusRule have no Kubernetes schema and are skipped there); check and
# unit-test the alert rules; check every dashboard/alert expression parses and names real
# metrics; check the chart's copies of the rules and dashboard.
lint-deploy: tools
	uv run --frozen hadolint --failure-threshold warning Dockerfile
	cmp deploy/prometheus/alerts.yaml $(DEPLOY_CHART)/files/alerts.yaml
	cmp dashboards/rightfoot-poller.json $(DEPLOY_CHART)/files/rightfoot-poller.json
	promtool check rules deploy/prometheus/alerts.yaml
	promtool test rules deploy/prometheus/alerts.test.yaml
	uv run --frozen python tests/promql.py --check
	@set -e; for values in $(DEPLOY_CHART)/ci/*-values.yaml; do \
	  echo "== $$values"; \
	  $(DEPLOY_TOOLS)/helm lint --strict --quiet $(DEPLOY_CHART) -f $$values; \
	  for version in $(DEPLOY_KUBE_VERSIONS); do \
	    $(DEPLOY_TOOLS)/helm template ci $(DEPLOY_CHART) -f $$values --kube-version $$version \
	    | $(DEPLOY_TOOLS)/kubeconform -strict -summary -kubernetes-version $$version \
	        -schema-location '$(DEPLOY_SCHEMAS)' -skip ServiceMonitor,PrometheusRule -; \
	  done; \
	done

# Copy the alert rules and the dashboard into the chart (helm can only read files inside it).
sync-deploy-copies:
	cp deploy/prometheus/alerts.yaml $(DEPLOY_CHART)/files/alerts.yaml
	cp dashboards/rightfoot-poller.json $(DEPLOY_CHART)/files/rightfoot-poller.json

# ---------------------------------------------------------------------------
# The chart against a real Kubernetes API server (scripts/k8s/check.sh): etcd (Debian
# etcd-server) and kube-apiserver + kubectl (pinned, built from the Go module proxy by
# scripts/k8s/build.sh into .cache/k8s; the first run builds them, 4-12 min) on loopback;
# every ci/*-values.yaml through a server-side dry run and a real helm install/uninstall.
# K8S_CHECK_KEEP=1 keeps the run directory (.run/k8s-check.*) with the servers' logs.
# ---------------------------------------------------------------------------
.PHONY: k8s-check
k8s-check: tools
	scripts/k8s/check.sh

# ---------------------------------------------------------------------------
# Performance (docs/performance.md, bench/run_all.py): throughput against two
# aiohttp+aiokafka ceilings (per-message and batched) and a peer, Benthos 4.27, on
# 1,000,000 records, 10,000 batches on one replica for 3 minutes, latency from the API
# to Kafka, one batch of 1,000,000 records SIGKILLed halfway and 100,000 records
# finishing out of order; one JSON line at the end.
# Runs its own broker on BENCH_KAFKA_PORT and stops it; BENCH_ARGS are passed on (e.g.
# --workdir DIR). tests/test_bench_smoke.py runs the same at toy sizes in `make test`.
# ---------------------------------------------------------------------------
BENCH_KAFKA_PORT ?= 29092
BENCH_ARGS ?=

# The benchmark's peer, Benthos 4.27.0 (bench/benthos.yaml): built by scripts/benthos.sh
# into .cache/benthos from scripts/benthos/ if missing (needs go; ~1-3 min the first time).
.PHONY: benthos
benthos:
	scripts/benthos.sh

bench: export PATH := $(UV_PATH)
bench: install benthos
	KAFKA_PORT=$(BENCH_KAFKA_PORT) scripts/kafka.sh start
	@rc=0; $(UV) run --frozen python bench/run_all.py \
	  --bootstrap 127.0.0.1:$(BENCH_KAFKA_PORT) $(BENCH_ARGS) || rc=$$?; \
	  KAFKA_PORT=$(BENCH_KAFKA_PORT) scripts/kafka.sh stop; exit $$rc

# ---------------------------------------------------------------------------
# Local schema registry (Apicurio Registry from Maven Central, in-memory; see
# scripts/registry.sh). Its Confluent-compatible API: http://127.0.0.1:8081/apis/ccompat/v7
# Settings: REGISTRY_PORT (8081), REGISTRY_MANAGEMENT_PORT (+1000), REGISTRY_DIR, ...
# The tests start their own on REGISTRY_TEST_PORT (18481) and stop it.
# ---------------------------------------------------------------------------
.PHONY: registry-start registry-stop registry-status

registry-start:
	scripts/registry.sh start

registry-stop:
	scripts/registry.sh stop

registry-status:
	scripts/registry.sh status
