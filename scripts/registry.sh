#!/usr/bin/env bash
# Runs a real schema registry for local work and the tests: Apicurio Registry (Apache-2.0),
# from its Maven Central artifact, on 127.0.0.1, with in-memory storage (H2, its default:
# everything is lost at stop). Clients use its Confluent-compatible API:
#   http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7
#
# Usage: scripts/registry.sh start|stop|status|fetch
#
#   start    Start the registry and wait until its Confluent-compatible API answers
#            (~15-35 s on two cores). Idempotent: a ready registry of REGISTRY_DIR is reused.
#   stop     SIGTERM the registry started from REGISTRY_DIR, SIGKILL after 20 s. Idempotent.
#   status   Exit 0 if the registry of REGISTRY_DIR is running and ready.
#   fetch    Only download and unpack the distribution (into .cache/apicurio).
#
# Environment (defaults):
#   REGISTRY_PORT=8081                         HTTP (REST and ccompat APIs)
#   REGISTRY_MANAGEMENT_PORT=REGISTRY_PORT+1000 health checks (/health/ready), metrics
#   REGISTRY_DIR=<repo>/.run/registry-PORT      registry.pid, registry.log
#   REGISTRY_VERSION=3.3.3                     io.apicurio:apicurio-registry-app
#   REGISTRY_JAVA_HOME=/usr/lib/jvm/temurin-25-jdk-amd64   Java 21+ (17 cannot run it)
#   REGISTRY_HEAP="-Xms64m -Xmx384m"
#   REGISTRY_OPTS=""                           extra JVM options / -D properties
#   REGISTRY_READY_TIMEOUT=180                 seconds to wait for readiness
#
# The distribution is fetched once with `mvn dependency:copy` (mvn checks the artifact's
# SHA-1 from Maven Central, --strict-checksums) and unpacked under .cache/apicurio/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

REGISTRY_HOST=127.0.0.1
REGISTRY_PORT="${REGISTRY_PORT:-8081}"
REGISTRY_MANAGEMENT_PORT="${REGISTRY_MANAGEMENT_PORT:-$((REGISTRY_PORT + 1000))}"
REGISTRY_DIR="${REGISTRY_DIR:-$REPO_ROOT/.run/registry-$REGISTRY_PORT}"
REGISTRY_VERSION="${REGISTRY_VERSION:-3.3.3}"
REGISTRY_JAVA_HOME="${REGISTRY_JAVA_HOME:-/usr/lib/jvm/temurin-25-jdk-amd64}"
REGISTRY_HEAP="${REGISTRY_HEAP:--Xms64m -Xmx384m}"
REGISTRY_OPTS="${REGISTRY_OPTS:-}"
REGISTRY_READY_TIMEOUT="${REGISTRY_READY_TIMEOUT:-180}"
REGISTRY_STOP_TIMEOUT="${REGISTRY_STOP_TIMEOUT:-20}"

ARTIFACT="io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all"
CACHE_DIR="$REPO_ROOT/.cache/apicurio"
DIST_DIR="$CACHE_DIR/apicurio-registry-app-$REGISTRY_VERSION"
RUN_JAR="$DIST_DIR/quarkus-run.jar"
PID_FILE="$REGISTRY_DIR/registry.pid"
LOG_FILE="$REGISTRY_DIR/registry.log"
# On the JVM's command line so that `stop` only ever signals the registry of this dir.
PROC_MARKER="-Dregistry.sh.dir=$REGISTRY_DIR"
API_URL="http://$REGISTRY_HOST:$REGISTRY_PORT/apis/ccompat/v7"
READY_URL="http://$REGISTRY_HOST:$REGISTRY_MANAGEMENT_PORT/health/ready"

log() { echo "registry.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------- distribution

dist_ok() { [[ -f "$RUN_JAR" && -f "$DIST_DIR/.complete" ]]; }

fetch() {
  dist_ok && return 0
  command -v mvn > /dev/null || die "mvn not found (needed once to fetch Apicurio Registry from Maven Central)"
  mkdir -p "$CACHE_DIR"
  (
    # Serialise concurrent fetches (several test sessions starting registries).
    flock -w 900 8 || die "timed out waiting for $CACHE_DIR/.fetch.lock"
    dist_ok && exit 0
    local tarball="$CACHE_DIR/apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz" attempt
    for attempt in 1 2 3; do
      if [[ -s "$tarball" ]] || mvn -B -q -C -Dstyle.color=never dependency:copy \
        -Dartifact="$ARTIFACT" -DoutputDirectory="$CACHE_DIR" > "$CACHE_DIR/mvn.log" 2>&1; then
        local tmp="$DIST_DIR.tmp.$$"
        rm -rf "$tmp" && mkdir -p "$tmp"
        if tar -xzf "$tarball" -C "$tmp" && [[ -f "$tmp/quarkus-run.jar" ]]; then
          touch "$tmp/.complete"
          rm -rf "$DIST_DIR" && mv "$tmp" "$DIST_DIR"
          rm -f "$tarball"
          exit 0
        fi
        log "the downloaded archive does not unpack (attempt $attempt); fetching it again"
        rm -rf "$tmp" "$tarball"
      else
        log "mvn dependency:copy failed (attempt $attempt), see $CACHE_DIR/mvn.log"
      fi
      sleep $((attempt * 2))
    done
    tail -n 30 "$CACHE_DIR/mvn.log" >&2 || true
    die "could not fetch $ARTIFACT with mvn"
  ) 8> "$CACHE_DIR/.fetch.lock"
}

# ---------------------------------------------------------------- processes

# Is $1 a live (non-zombie) process? PID 1 here may not reap orphans.
alive() {
  local state
  [[ -r "/proc/$1/stat" ]] || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2> /dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# Is $1 the registry of this REGISTRY_DIR?
is_ours() {
  alive "$1" || return 1
  tr '\0' '\n' < "/proc/$1/cmdline" 2> /dev/null | grep -qxF -- "$PROC_MARKER"
}

our_pid() {
  local pid
  [[ -s "$PID_FILE" ]] || return 1
  pid="$(< "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] && is_ours "$pid" && echo "$pid"
}

port_open() { (exec 3<> "/dev/tcp/$REGISTRY_HOST/$1") 2> /dev/null; }

# Ready: the management health check says UP and the ccompat API answers.
ready() {
  curl -fsS -m 3 -o /dev/null "$READY_URL" 2> /dev/null &&
    curl -fsS -m 3 -o /dev/null "$API_URL/subjects" 2> /dev/null
}

show_log() {
  [[ -f "$LOG_FILE" ]] && { log "last lines of $LOG_FILE:"; tail -n 25 "$LOG_FILE" >&2; }
  return 0
}

start() {
  local pid
  if pid="$(our_pid)"; then
    if wait_ready "$pid"; then
      log "already running (pid $pid): $API_URL"
      return 0
    fi
    die "the registry of $REGISTRY_DIR (pid $pid) is running but not ready; try: $0 stop"
  fi
  local port
  for port in "$REGISTRY_PORT" "$REGISTRY_MANAGEMENT_PORT"; do
    port_open "$port" && die "port $port on $REGISTRY_HOST is already taken by another process"
  done
  [[ -x "$REGISTRY_JAVA_HOME/bin/java" ]] ||
    die "no java at $REGISTRY_JAVA_HOME/bin/java: Apicurio Registry needs Java 21+ (set REGISTRY_JAVA_HOME)"
  fetch
  mkdir -p "$REGISTRY_DIR"
  local started=$SECONDS
  # shellcheck disable=SC2086 # REGISTRY_HEAP and REGISTRY_OPTS are lists of options
  (
    cd "$REGISTRY_DIR"
    exec setsid "$REGISTRY_JAVA_HOME/bin/java" $REGISTRY_HEAP -XX:+UseSerialGC \
      -XX:TieredStopAtLevel=1 -Djava.awt.headless=true "$PROC_MARKER" \
      -Dquarkus.http.host="$REGISTRY_HOST" -Dquarkus.http.port="$REGISTRY_PORT" \
      -Dquarkus.management.host="$REGISTRY_HOST" \
      -Dquarkus.management.port="$REGISTRY_MANAGEMENT_PORT" \
      $REGISTRY_OPTS -jar "$RUN_JAR" < /dev/null > "$LOG_FILE" 2>&1
  ) &
  pid=$!
  echo "$pid" > "$PID_FILE"
  if ! wait_ready "$pid"; then
    show_log
    stop_pid "$pid"
    die "the registry did not become ready within ${REGISTRY_READY_TIMEOUT}s"
  fi
  log "ready after $((SECONDS - started))s (pid $pid): $API_URL"
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + REGISTRY_READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    alive "$pid" || {
      show_log
      die "the registry (pid $pid) exited during start-up"
    }
    ready && return 0
    sleep 0.5
  done
  return 1
}

stop_pid() {
  local pid="$1" deadline=$((SECONDS + REGISTRY_STOP_TIMEOUT))
  kill -TERM "$pid" 2> /dev/null || true
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if alive "$pid"; then
    log "still running after ${REGISTRY_STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
  fi
  rm -f "$PID_FILE"
}

stop() {
  local pid
  if pid="$(our_pid)"; then
    stop_pid "$pid"
    log "stopped (pid $pid)"
  else
    rm -f "$PID_FILE"
    log "not running (nothing started from $REGISTRY_DIR)"
  fi
}

status() {
  local pid
  if pid="$(our_pid)" && ready; then
    echo "registry: ready (pid $pid): $API_URL"
    return 0
  fi
  echo "registry: not ready ($REGISTRY_DIR)"
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *)
    echo "usage: $0 start|stop|status|fetch" >&2
    exit 2
    ;;
esac
