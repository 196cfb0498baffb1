#!/usr/bin/env bash
# Runs a real single-node Apache Kafka (KRaft: broker and controller in one JVM)
# on 127.0.0.1, from its Maven Central artifacts. Used by `make run`, the tests and CI.
#
# Usage: scripts/kafka.sh start|stop|status|classpath
#
#   start      Start the broker and wait until it can really serve clients
#              (metadata, transactions, consumer groups; see scripts/kafka_ready.py).
#              Idempotent: a ready broker already on the port is reused.
#              The data dir is wiped and formatted anew unless KAFKA_KEEP_DATA=1,
#              which keeps already formatted data (restart of the same broker).
#   stop       SIGTERM the broker started from KAFKA_DIR, SIGKILL after 30 s. Idempotent.
#   status     Exit 0 if a broker answers on the port and is ready.
#   classpath  Fetch the jars (mvn, cached in ~/.m2) and print the classpath file.
#
# Environment (defaults):
#   KAFKA_PORT=9092                       PLAINTEXT listener on 127.0.0.1
#   KAFKA_CONTROLLER_PORT=KAFKA_PORT+1000 KRaft controller listener
#   KAFKA_DIR=<repo>/.run/kafka-PORT      server.properties, data/, logs/, kafka.pid
#   KAFKA_HEAP="-Xms256m -Xmx768m"
#   KAFKA_OPTS=""                         extra JVM options for the broker
#   KAFKA_EXTRA_PROPS=""                  file whose properties are appended to server.properties
#   KAFKA_KEEP_DATA=0                     1 = keep the formatted data dir across start
#   KAFKA_READY_TIMEOUT=120               seconds to wait for readiness
#
# Secured listeners (off by default; PLAINTEXT stays the listener for inter-broker traffic
# and the readiness check). Each port set adds one listener on 127.0.0.1:
#   KAFKA_SASL_SSL_PORT=""        SASL_SSL: TLS, then PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
#   KAFKA_SASL_PLAINTEXT_PORT=""  SASL_PLAINTEXT: the same mechanisms without TLS
#   KAFKA_SSL_PORT=""             SSL: TLS only; client certificates required when KAFKA_SSL_CA
#                                 is set (mutual TLS)
#   KAFKA_SSL_CERT=""             broker certificate chain, PEM, leaf first; its SANs must name
#                                 127.0.0.1 (needed by the SASL_SSL and SSL listeners)
#   KAFKA_SSL_KEY=""              the broker certificate's key: PEM, unencrypted PKCS#8
#                                 ("BEGIN PRIVATE KEY")
#   KAFKA_SSL_CA=""               PEM CA(s) that client certificates must chain to (SSL listener)
#   KAFKA_SASL_USERS_FILE=""      users of the SASL listeners, one "name password" per line:
#                                 their SCRAM-SHA-256 and SCRAM-SHA-512 credentials are created
#                                 when the storage is formatted, and they are the PLAIN users of
#                                 the listeners' JAAS configuration (server.properties is then
#                                 mode 600)
# Whoever starts the broker makes the certificates (the tests make theirs with Python's
# cryptography, see tests/certs.py and docs/security.md).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

KAFKA_HOST=127.0.0.1
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1000))}"
KAFKA_DIR="${KAFKA_DIR:-$REPO_ROOT/.run/kafka-$KAFKA_PORT}"
KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx768m}"
KAFKA_OPTS="${KAFKA_OPTS:-}"
KAFKA_EXTRA_PROPS="${KAFKA_EXTRA_PROPS:-}"
KAFKA_KEEP_DATA="${KAFKA_KEEP_DATA:-0}"
KAFKA_READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-}"
KAFKA_SASL_PLAINTEXT_PORT="${KAFKA_SASL_PLAINTEXT_PORT:-}"
KAFKA_SSL_PORT="${KAFKA_SSL_PORT:-}"
KAFKA_SSL_CERT="${KAFKA_SSL_CERT:-}"
KAFKA_SSL_KEY="${KAFKA_SSL_KEY:-}"
KAFKA_SSL_CA="${KAFKA_SSL_CA:-}"
KAFKA_SASL_USERS_FILE="${KAFKA_SASL_USERS_FILE:-}"
SASL_MECHANISMS=(PLAIN SCRAM-SHA-256 SCRAM-SHA-512)

POM="$SCRIPT_DIR/kafka/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/kafka/log4j2.properties"
READY_PY="$SCRIPT_DIR/kafka_ready.py"
CACHE_DIR="$REPO_ROOT/.cache/kafka"
CLASSPATH_FILE="$CACHE_DIR/classpath.txt"

PROPS_FILE="$KAFKA_DIR/server.properties"
DATA_DIR="$KAFKA_DIR/data"
LOG_DIR="$KAFKA_DIR/logs"
LOG_FILE="$LOG_DIR/server.log"  # log4j2 (scripts/kafka/log4j2.properties)
OUT_FILE="$LOG_DIR/kafka.out"   # JVM stdout/stderr (crashes, GC errors)
PID_FILE="$KAFKA_DIR/kafka.pid"
KEYSTORE_FILE="$KAFKA_DIR/broker-keystore.pem"  # KAFKA_SSL_KEY + KAFKA_SSL_CERT, mode 600
LOCK_FILE="$KAFKA_DIR.lock"     # outside KAFKA_DIR, which may be wiped
# Put on the broker's command line so `stop` only ever signals the broker of this dir.
PROC_MARKER="-Dkafka.sh.dir=$KAFKA_DIR"

BROKER_JVM_OPTS=(-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20
  -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
  -Djava.awt.headless=true)
# Short-lived tool JVMs (StorageTool): start fast, stay small.
TOOL_JVM_OPTS=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto)

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- jars / classpath

classpath_ok() {
  [[ -s "$CLASSPATH_FILE" && ! "$POM" -nt "$CLASSPATH_FILE" ]] || return 1
  local jar jars
  IFS=: read -r -a jars < "$CLASSPATH_FILE"
  ((${#jars[@]} > 0)) || return 1
  for jar in "${jars[@]}"; do [[ -f "$jar" ]] || return 1; done
}

ensure_classpath() {
  classpath_ok && return 0
  command -v mvn > /dev/null || die "mvn not found (needed once to fetch Kafka from Maven Central)"
  mkdir -p "$CACHE_DIR"
  (
    # Serialise concurrent fetches (parallel CI jobs, tests starting brokers on several ports).
    flock -w 600 8 || die "timed out waiting for $CACHE_DIR/.fetch.lock"
    classpath_ok && exit 0
    local tmp="$CLASSPATH_FILE.tmp.$$" attempt
    for attempt in 1 2 3; do
      if mvn -B -q -Dstyle.color=never -f "$POM" \
        dependency:build-classpath -Dmdep.includeScope=runtime \
        -Dmdep.outputFile="$tmp" > "$CACHE_DIR/mvn.log" 2>&1; then
        mv -f "$tmp" "$CLASSPATH_FILE"
        classpath_ok && exit 0
        log "classpath from mvn lists missing jars (attempt $attempt)"
      else
        log "mvn dependency:build-classpath failed (attempt $attempt), see $CACHE_DIR/mvn.log"
      fi
      rm -f "$tmp"
      sleep $((attempt * 2))
    done
    tail -n 30 "$CACHE_DIR/mvn.log" >&2 || true
    die "could not fetch Kafka jars with mvn"
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

# Is $1 the broker of this KAFKA_DIR?
is_our_broker() {
  alive "$1" || return 1
  local cmdline
  cmdline="$(tr '\0' '\n' < "/proc/$1/cmdline" 2> /dev/null)" || return 1
  grep -qxF -- "$PROC_MARKER" <<< "$cmdline" && grep -qxF kafka.Kafka <<< "$cmdline"
}

# Prints the pid of the broker of this KAFKA_DIR, from the pid file or, if that is
# gone, by looking for the exact marker on a kafka.Kafka command line.
our_pid() {
  local pid
  if [[ -s "$PID_FILE" ]]; then
    pid="$(< "$PID_FILE")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && is_our_broker "$pid"; then
      echo "$pid"
      return 0
    fi
  fi
  local cmdline
  while read -r cmdline; do
    pid="${cmdline#/proc/}"
    pid="${pid%/cmdline}"
    if is_our_broker "$pid"; then
      echo "$pid"
      return 0
    fi
  done < <(grep -lsaF -- "$PROC_MARKER" /proc/[0-9]*/cmdline 2> /dev/null || true)
  return 1
}

port_open() { (exec 3<> "/dev/tcp/$KAFKA_HOST/$1") 2> /dev/null; }

# "pid N, log PATH" for the broker of this KAFKA_DIR, or says it is someone else's.
describe() {
  local pid
  if pid="$(our_pid)"; then
    echo "pid $pid, log $LOG_FILE"
  else
    echo "not started from $KAFKA_DIR"
  fi
}

# ---------------------------------------------------------------- readiness

# Runs scripts/kafka_ready.py in the project venv: metadata round trip, a committed
# transaction and a consumer-group join/commit. Extra args are passed through.
ready_check() {
  if command -v uv > /dev/null; then
    uv run --frozen --quiet --project "$REPO_ROOT" python "$READY_PY" \
      --bootstrap "$KAFKA_HOST:$KAFKA_PORT" "$@"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    "$REPO_ROOT/.venv/bin/python" "$READY_PY" --bootstrap "$KAFKA_HOST:$KAFKA_PORT" "$@"
  else
    die "uv not found and no .venv: install uv (pip install uv==0.13.8) and run 'uv sync --frozen'"
  fi
}

show_logs() {
  local f
  for f in "$LOG_DIR/format.log" "$OUT_FILE" "$LOG_FILE"; do
    if [[ -s "$f" ]]; then
      echo "----- tail of $f" >&2
      tail -n 40 "$f" >&2
    fi
  done
}

# ---------------------------------------------------------------- configuration

# One listener per line: NAME PROTOCOL PORT ADVERTISED(yes|no).
# The secured listeners' ssl.*/sasl.* properties come from write_security_props.
listener_table() {
  echo "PLAINTEXT PLAINTEXT $KAFKA_PORT yes"
  echo "CONTROLLER PLAINTEXT $KAFKA_CONTROLLER_PORT no"
  [[ -z "$KAFKA_SASL_SSL_PORT" ]] || echo "SASL_SSL SASL_SSL $KAFKA_SASL_SSL_PORT yes"
  [[ -z "$KAFKA_SASL_PLAINTEXT_PORT" ]] ||
    echo "SASL_PLAINTEXT SASL_PLAINTEXT $KAFKA_SASL_PLAINTEXT_PORT yes"
  [[ -z "$KAFKA_SSL_PORT" ]] || echo "SSL SSL $KAFKA_SSL_PORT yes"
}

uses_tls() { [[ -n "$KAFKA_SASL_SSL_PORT" || -n "$KAFKA_SSL_PORT" ]]; }
uses_sasl() { [[ -n "$KAFKA_SASL_SSL_PORT" || -n "$KAFKA_SASL_PLAINTEXT_PORT" ]]; }

# The "name password" lines of KAFKA_SASL_USERS_FILE, checked; blank and # lines skipped.
sasl_users() {
  local name password rest
  while read -r name password rest || [[ -n "$name" ]]; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    [[ -n "$password" && -z "$rest" ]] ||
      die "KAFKA_SASL_USERS_FILE: each line must be 'name password' (user $name)"
    [[ "$name$password" =~ ^[A-Za-z0-9._@+-]+$ ]] ||
      die "KAFKA_SASL_USERS_FILE: user $name: only letters, digits and ._@+- are supported"
    echo "$name $password"
  done < "$KAFKA_SASL_USERS_FILE"
}

# Checked before the data dir is wiped and formatted.
check_security_settings() {
  local port
  for port in "$KAFKA_SASL_SSL_PORT" "$KAFKA_SASL_PLAINTEXT_PORT" "$KAFKA_SSL_PORT"; do
    [[ -z "$port" ]] && continue
    [[ "$port" =~ ^[0-9]+$ ]] || die "listener port '$port' is not a number"
    port_open "$port" && die "port $port is in use"
  done
  if uses_tls; then
    [[ -f "$KAFKA_SSL_CERT" && -f "$KAFKA_SSL_KEY" ]] ||
      die "the SASL_SSL and SSL listeners need KAFKA_SSL_CERT and KAFKA_SSL_KEY (PEM files)"
    grep -q -- "-----BEGIN PRIVATE KEY-----" "$KAFKA_SSL_KEY" ||
      die "KAFKA_SSL_KEY must be an unencrypted PKCS#8 PEM key (BEGIN PRIVATE KEY)"
  fi
  [[ -z "$KAFKA_SSL_CA" || -f "$KAFKA_SSL_CA" ]] || die "KAFKA_SSL_CA=$KAFKA_SSL_CA is not a file"
  if uses_sasl; then
    [[ -f "$KAFKA_SASL_USERS_FILE" ]] ||
      die "the SASL listeners need KAFKA_SASL_USERS_FILE (lines 'name password')"
    local users
    users="$(sasl_users)" || exit 1
    [[ -n "$users" ]] || die "KAFKA_SASL_USERS_FILE lists no user"
  fi
  return 0
}

# ssl.* and sasl.* properties of the secured listeners (nothing when none is configured).
write_security_props() {
  if uses_tls; then
    # Kafka reads a PEM "keystore": one file with the private key and the certificate chain.
    (umask 077 && cat "$KAFKA_SSL_KEY" "$KAFKA_SSL_CERT" > "$KEYSTORE_FILE")
    echo "ssl.keystore.type=PEM"
    echo "ssl.keystore.location=$KEYSTORE_FILE"
    echo "ssl.enabled.protocols=TLSv1.2,TLSv1.3"
    if [[ -n "$KAFKA_SSL_CA" ]]; then
      echo "ssl.truststore.type=PEM"
      echo "ssl.truststore.location=$KAFKA_SSL_CA"
      [[ -z "$KAFKA_SSL_PORT" ]] || echo "listener.name.ssl.ssl.client.auth=required"
    fi
  fi
  if uses_sasl; then
    local mechanisms listener mech plain="" name password
    mechanisms="$(IFS=, && echo "${SASL_MECHANISMS[*]}")"
    echo "sasl.enabled.mechanisms=$mechanisms"
    while read -r name password; do
      plain+=" user_$name=\"$password\""
    done < <(sasl_users)
    for listener in sasl_ssl sasl_plaintext; do
      echo "listener.name.$listener.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain;"
      for mech in scram-sha-256 scram-sha-512; do
        echo "listener.name.$listener.$mech.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
      done
    done
  fi
  return 0
}

# --add-scram arguments of StorageTool format, one per line: each user, both SCRAM mechanisms.
scram_format_args() {
  uses_sasl || return 0
  local name password mech
  while read -r name password; do
    for mech in SCRAM-SHA-256 SCRAM-SHA-512; do
      printf '%s\n' --add-scram "$mech=[name=$name,password=$password]"
    done
  done < <(sasl_users)
}

write_listener_props() {
  local name proto port adv listeners=() advertised=() protomap=()
  while read -r name proto port adv; do
    listeners+=("$name://$KAFKA_HOST:$port")
    protomap+=("$name:$proto")
    [[ "$adv" == yes ]] && advertised+=("$name://$KAFKA_HOST:$port")
  done < <(listener_table)
  local IFS=,
  echo "listeners=${listeners[*]}"
  echo "advertised.listeners=${advertised[*]}"
  echo "listener.security.protocol.map=${protomap[*]}"
  echo "controller.listener.names=CONTROLLER"
  echo "inter.broker.listener.name=PLAINTEXT"
}

write_properties() {
  {
    echo "# Written by scripts/kafka.sh on every start; edits are lost."
    echo "process.roles=broker,controller"
    echo "node.id=1"
    echo "controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT"
    write_listener_props
    cat << EOF
log.dirs=$DATA_DIR
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.cleaner.enable=true
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=8388608
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
# After a kill -9 the restarted controller still holds the dead broker's session and
# refuses the new registration (DUPLICATE_BROKER_REGISTRATION) until that session
# times out: 9 s by default. Shorter keeps KAFKA_KEEP_DATA restarts after a crash fast.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
background.threads=4
log.retention.hours=168
log.segment.bytes=67108864
EOF
    write_security_props
    if [[ -n "$KAFKA_EXTRA_PROPS" ]]; then
      echo "# --- appended from KAFKA_EXTRA_PROPS=$KAFKA_EXTRA_PROPS"
      cat "$KAFKA_EXTRA_PROPS"
      echo
    fi
  } > "$PROPS_FILE.tmp"
  if uses_sasl; then chmod 600 "$PROPS_FILE.tmp"; fi # the PLAIN users' passwords
  mv -f "$PROPS_FILE.tmp" "$PROPS_FILE"
}

run_tool() {
  java "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -Dkafka.logs.dir="$LOG_DIR" -cp "$(< "$CLASSPATH_FILE")" "$@"
}

format_storage() {
  local cluster_id
  cluster_id="$(run_tool kafka.tools.StorageTool random-uuid 2>> "$LOG_DIR/format.log")" ||
    { show_logs; die "StorageTool random-uuid failed"; }
  local scram=()
  mapfile -t scram < <(scram_format_args)
  run_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS_FILE" \
    ${scram[@]+"${scram[@]}"} >> "$LOG_DIR/format.log" 2>&1 ||
    { show_logs; die "StorageTool format failed"; }
}

# ---------------------------------------------------------------- commands

stop_broker() {
  local pid i
  if ! pid="$(our_pid)"; then
    rm -f "$PID_FILE"
    log "not running ($KAFKA_DIR)"
    return 0
  fi
  kill -TERM "$pid" 2> /dev/null || true
  for ((i = 0; i < KAFKA_STOP_TIMEOUT * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    log "broker pid $pid still up after ${KAFKA_STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
    for ((i = 0; i < 100; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    alive "$pid" && die "could not kill broker pid $pid"
  fi
  rm -f "$PID_FILE"
  log "stopped broker pid $pid ($KAFKA_DIR)"
}

start_broker() {
  local pid
  # A ready broker on the port (ours or anyone's) is reused. A broker that was just
  # killed may still accept connections for a moment: --down-grace gives up (rc 4)
  # as soon as the port stays closed, and we start a new one.
  if port_open "$KAFKA_PORT"; then
    local rc=0
    ready_check --timeout 30 --down-grace 2 || rc=$?
    if ((rc == 0)); then
      echo "kafka ready on $KAFKA_HOST:$KAFKA_PORT ($(describe)) [already running]"
      return 0
    fi
    if ((rc != 4)) && port_open "$KAFKA_PORT"; then
      # Our own broker that is not ready (hung or shutting down): replace it.
      our_pid > /dev/null ||
        die "port $KAFKA_PORT is in use by something that is not a ready Kafka broker"
      log "broker of $KAFKA_DIR answers but is not ready; restarting it"
    fi
  fi
  # Our broker without an open port (starting, hung or dying): replace it.
  stop_broker 2> /dev/null
  port_open "$KAFKA_CONTROLLER_PORT" &&
    die "controller port $KAFKA_CONTROLLER_PORT is in use (set KAFKA_CONTROLLER_PORT)"

  [[ -z "$KAFKA_EXTRA_PROPS" || -f "$KAFKA_EXTRA_PROPS" ]] ||
    die "KAFKA_EXTRA_PROPS=$KAFKA_EXTRA_PROPS is not a file"
  check_security_settings
  ensure_classpath
  mkdir -p "$KAFKA_DIR"
  if [[ "$KAFKA_KEEP_DATA" == 1 && -f "$DATA_DIR/meta.properties" ]]; then
    mkdir -p "$LOG_DIR"
    write_properties
    log "keeping formatted data in $DATA_DIR"
  else
    # Nothing runs from this dir (checked above), so whatever is left is stale:
    # a killed broker's data, lock files, another cluster id. Start clean.
    rm -rf "$DATA_DIR" "$LOG_DIR.prev"
    [[ -d "$LOG_DIR" ]] && mv "$LOG_DIR" "$LOG_DIR.prev"
    mkdir -p "$DATA_DIR" "$LOG_DIR"
    write_properties
    format_storage
  fi

  local heap
  read -r -a heap <<< "$KAFKA_HEAP"
  local extra=()
  [[ -n "$KAFKA_OPTS" ]] && read -r -a extra <<< "$KAFKA_OPTS"
  # setsid + nohup: survives the calling shell/make/pytest. All inherited fds are
  # redirected or closed (fd 9 is the start lock) so callers capturing our output
  # do not hang and the lock is not held by the broker.
  setsid nohup java "${heap[@]}" "${BROKER_JVM_OPTS[@]}" ${extra[@]+"${extra[@]}"} \
    "$PROC_MARKER" \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
    -cp "$(< "$CLASSPATH_FILE")" kafka.Kafka "$PROPS_FILE" \
    < /dev/null >> "$OUT_FILE" 2>&1 9>&- &
  pid=$!
  echo "$pid" > "$PID_FILE"

  local rc=0
  ready_check --timeout "$KAFKA_READY_TIMEOUT" --pid "$pid" || rc=$?
  if ((rc != 0)); then
    show_logs
    if ((rc == 3)); then
      rm -f "$PID_FILE"
      die "broker process $pid exited during startup (log $LOG_FILE, JVM output $OUT_FILE)"
    fi
    stop_broker 2> /dev/null || true
    die "broker on $KAFKA_HOST:$KAFKA_PORT not ready within ${KAFKA_READY_TIMEOUT}s, stopped it (log $LOG_FILE)"
  fi
  echo "kafka ready on $KAFKA_HOST:$KAFKA_PORT (pid $pid, log $LOG_FILE)"
}

status_broker() {
  if port_open "$KAFKA_PORT" && ready_check --timeout "${KAFKA_STATUS_TIMEOUT:-15}"; then
    echo "kafka ready on $KAFKA_HOST:$KAFKA_PORT ($(describe))"
    return 0
  fi
  echo "kafka not ready on $KAFKA_HOST:$KAFKA_PORT ($(describe))"
  return 1
}

with_lock() {
  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 9> "$LOCK_FILE"
  flock -w 600 9 || die "timed out waiting for $LOCK_FILE"
  "$@"
}

case "${1:-}" in
  start) with_lock start_broker ;;
  stop) with_lock stop_broker ;;
  status) status_broker ;;
  classpath)
    ensure_classpath
    echo "$CLASSPATH_FILE"
    ;;
  *)
    echo "usage: $0 start|stop|status|classpath" >&2
    exit 2
    ;;
esac
