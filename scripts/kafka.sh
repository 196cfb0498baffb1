#!/usr/bin/env bash
# Runs a real single-node Apache Kafka (KRaft: broker and controller in one JVM)
# on 127.0.0.1, from its Maven Central artifacts. Used by `make run`, the tests and CI.
# Cluster mode runs three such nodes as one cluster, to lose and restore brokers.
#
# Usage: scripts/kafka.sh start|stop|status|classpath
#        scripts/kafka.sh cluster-start|cluster-stop|cluster-status
#        scripts/kafka.sh node-kill|node-stop|node-start N     (N = 1, 2 or 3)
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
#   KAFKA_ADVERTISED_PORT=KAFKA_PORT      the PLAINTEXT port the broker gives its clients
#                                         (a proxy's, whose upstream is KAFKA_PORT; the
#                                         proxy must be up before start)
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
#
# Cluster mode: three KRaft nodes, each broker and controller (node ids 1, 2, 3), one
# cluster id formatted into the three data dirs, controller.quorum.voters naming all
# three. default.replication.factor=3 and min.insync.replicas=2, and the same for the
# consumer-offsets, transaction-state and share-state topics. The secured listeners
# are not available in this mode.
#   cluster-start   Start the three nodes and wait until the metadata lists three brokers
#                   and the cluster serves transactions and consumer groups (a probe
#                   topic with replication factor 3). Idempotent: a ready cluster is
#                   reused; otherwise the nodes of KAFKA_DIR are stopped and the cluster
#                   is formatted anew (KAFKA_KEEP_DATA=1 keeps formatted data).
#   cluster-stop    SIGTERM all three nodes at once, SIGKILL after KAFKA_STOP_TIMEOUT.
#                   Idempotent.
#   cluster-status  One line per node (pid or "down"); exit 0 if the cluster is ready.
#   node-kill N     SIGKILL node N: a broker (and controller) lost, no controlled shutdown.
#   node-stop N     SIGTERM node N (controlled shutdown), SIGKILL after KAFKA_STOP_TIMEOUT.
#   node-start N    Start node N again with its server.properties and data, and wait until
#                   it is back in the metadata and every partition of every topic has its
#                   whole replica set in sync again (scripts/kafka_ready.py --in-sync).
#                   Idempotent: a running node N is only waited for.
# Ports: node N listens on KAFKA_PORT+N-1 (PLAINTEXT, advertised) and
# KAFKA_CONTROLLER_PORT+N-1 (CONTROLLER); the bootstrap list is all three brokers,
# e.g. 127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194 with the defaults below.
#   KAFKA_PORT=9192                       first broker port of the cluster
#   KAFKA_CONTROLLER_PORT=KAFKA_PORT+1000 first controller port
#   KAFKA_DIR=<repo>/.run/kafka-cluster-PORT   node-1/ node-2/ node-3/, each as KAFKA_DIR above
#   KAFKA_HEAP="-Xms256m -Xmx512m"        per node
#   KAFKA_OPTS, KAFKA_EXTRA_PROPS, KAFKA_KEEP_DATA, KAFKA_READY_TIMEOUT: as above, per node
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

case "${1:-}" in
  cluster-* | node-*) CLUSTER_MODE=1 ;;
  *) CLUSTER_MODE=0 ;;
esac
CLUSTER_NODES=3

KAFKA_HOST=127.0.0.1
if ((CLUSTER_MODE)); then
  KAFKA_PORT="${KAFKA_PORT:-9192}"
  KAFKA_DIR="${KAFKA_DIR:-$REPO_ROOT/.run/kafka-cluster-$KAFKA_PORT}"
  KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx512m}"
else
  KAFKA_PORT="${KAFKA_PORT:-9092}"
  KAFKA_DIR="${KAFKA_DIR:-$REPO_ROOT/.run/kafka-$KAFKA_PORT}"
  KAFKA_HEAP="${KAFKA_HEAP:--Xms256m -Xmx768m}"
fi
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1000))}"
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

LOCK_FILE="$KAFKA_DIR.lock" # outside KAFKA_DIR, which may be wiped

# The files of one node, all under $1 (KAFKA_DIR, or a cluster node's dir).
node_paths() {
  NODE_DIR="$1"
  PROPS_FILE="$NODE_DIR/server.properties"
  DATA_DIR="$NODE_DIR/data"
  LOG_DIR="$NODE_DIR/logs"
  LOG_FILE="$LOG_DIR/server.log" # log4j2 (scripts/kafka/log4j2.properties)
  OUT_FILE="$LOG_DIR/kafka.out"  # JVM stdout/stderr (crashes, GC errors)
  PID_FILE="$NODE_DIR/kafka.pid"
  KEYSTORE_FILE="$NODE_DIR/broker-keystore.pem" # KAFKA_SSL_KEY + KAFKA_SSL_CERT, mode 600
  # Put on the broker's command line so `stop` only ever signals the broker of this dir.
  PROC_MARKER="-Dkafka.sh.dir=$NODE_DIR"
}

# The node that the functions below configure, start and stop: the single broker, or
# (cluster mode) the one select_node chose. Its PLAINTEXT and CONTROLLER ports are
# BROKER_PORT and CONTROLLER_PORT; the readiness check talks to READY_BOOTSTRAP.
NODE_ID=1
BROKER_PORT="$KAFKA_PORT"
CONTROLLER_PORT="$KAFKA_CONTROLLER_PORT"
QUORUM_VOTERS="1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT"
REPLICATION=1 # replication factor of the internal topics and the default for new ones
MIN_ISR=1
READY_BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
node_paths "$KAFKA_DIR"

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

# "pid N, log PATH" for the broker of this node's dir, or says it is someone else's.
describe() {
  local pid
  if pid="$(our_pid)"; then
    echo "pid $pid, log $LOG_FILE"
  else
    echo "not started from $NODE_DIR"
  fi
}

# ---------------------------------------------------------------- readiness

# Runs scripts/kafka_ready.py in the project venv: metadata round trip, a committed
# transaction and a consumer-group join/commit. Extra args are passed through.
ready_check() {
  if command -v uv > /dev/null; then
    uv run --frozen --quiet --project "$REPO_ROOT" python "$READY_PY" \
      --bootstrap "$READY_BOOTSTRAP" "$@"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    "$REPO_ROOT/.venv/bin/python" "$READY_PY" --bootstrap "$READY_BOOTSTRAP" "$@"
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

# One listener per line: NAME PROTOCOL PORT ADVERTISED(yes|no|the port advertised).
# The secured listeners' ssl.*/sasl.* properties come from write_security_props.
listener_table() {
  echo "PLAINTEXT PLAINTEXT $BROKER_PORT ${KAFKA_ADVERTISED_PORT:-yes}"
  echo "CONTROLLER PLAINTEXT $CONTROLLER_PORT no"
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
  if ((CLUSTER_MODE)) && [[ -n "$KAFKA_SASL_SSL_PORT$KAFKA_SASL_PLAINTEXT_PORT$KAFKA_SSL_PORT" ]]; then
    die "the secured listeners (KAFKA_SASL_SSL_PORT, ...) are not available in cluster mode"
  fi
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
    [[ "$adv" =~ ^[0-9]+$ ]] && advertised+=("$name://$KAFKA_HOST:$adv")
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
    echo "node.id=$NODE_ID"
    echo "controller.quorum.voters=$QUORUM_VOTERS"
    write_listener_props
    cat << EOF
log.dirs=$DATA_DIR
num.partitions=1
default.replication.factor=$REPLICATION
min.insync.replicas=$MIN_ISR
auto.create.topics.enable=false
offsets.topic.replication.factor=$REPLICATION
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$REPLICATION
transaction.state.log.min.isr=$MIN_ISR
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$REPLICATION
share.coordinator.state.topic.min.isr=$MIN_ISR
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

new_cluster_id() {
  run_tool kafka.tools.StorageTool random-uuid 2>> "$LOG_DIR/format.log" ||
    { show_logs; die "StorageTool random-uuid failed"; }
}

# Formats DATA_DIR for cluster id $1 (a new one when not given).
format_storage() {
  local cluster_id="${1:-}"
  [[ -n "$cluster_id" ]] || cluster_id="$(new_cluster_id)"
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
    log "not running ($NODE_DIR)"
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
  log "stopped broker pid $pid ($NODE_DIR)"
}

start_broker() {
  local pid
  # A ready broker on the port (ours or anyone's) is reused. A broker that was just
  # killed may still accept connections for a moment: --down-grace gives up (rc 4)
  # as soon as the port stays closed, and we start a new one.
  if port_open "$BROKER_PORT"; then
    local rc=0
    ready_check --timeout 30 --down-grace 2 || rc=$?
    if ((rc == 0)); then
      echo "kafka ready on $KAFKA_HOST:$BROKER_PORT ($(describe)) [already running]"
      return 0
    fi
    if ((rc != 4)) && port_open "$BROKER_PORT"; then
      # Our own broker that is not ready (hung or shutting down): replace it.
      our_pid > /dev/null ||
        die "port $BROKER_PORT is in use by something that is not a ready Kafka broker"
      log "broker of $NODE_DIR answers but is not ready; restarting it"
    fi
  fi
  # Our broker without an open port (starting, hung or dying): replace it.
  stop_broker 2> /dev/null
  port_open "$CONTROLLER_PORT" &&
    die "controller port $CONTROLLER_PORT is in use (set KAFKA_CONTROLLER_PORT)"

  [[ -z "$KAFKA_EXTRA_PROPS" || -f "$KAFKA_EXTRA_PROPS" ]] ||
    die "KAFKA_EXTRA_PROPS=$KAFKA_EXTRA_PROPS is not a file"
  check_security_settings
  ensure_classpath
  if [[ "$KAFKA_KEEP_DATA" == 1 && -f "$DATA_DIR/meta.properties" ]]; then
    mkdir -p "$LOG_DIR"
    write_properties
    log "keeping formatted data in $DATA_DIR"
  else
    fresh_node_dirs
    write_properties
    format_storage
  fi

  launch_node
  pid="$LAUNCHED_PID"
  local rc=0
  ready_check --timeout "$KAFKA_READY_TIMEOUT" --pid "$pid" || rc=$?
  if ((rc != 0)); then
    show_logs
    if ((rc == 3)); then
      rm -f "$PID_FILE"
      die "broker process $pid exited during startup (log $LOG_FILE, JVM output $OUT_FILE)"
    fi
    stop_broker 2> /dev/null || true
    die "broker on $KAFKA_HOST:$BROKER_PORT not ready within ${KAFKA_READY_TIMEOUT}s, stopped it (log $LOG_FILE)"
  fi
  echo "kafka ready on $KAFKA_HOST:$BROKER_PORT (pid $pid, log $LOG_FILE)"
}

# Nothing runs from the node's dir (checked by the caller), so whatever is left is
# stale: a killed broker's data, lock files, another cluster id. Start clean (the
# previous logs are kept as logs.prev).
fresh_node_dirs() {
  rm -rf "$DATA_DIR" "$LOG_DIR.prev"
  if [[ -d "$LOG_DIR" ]]; then mv "$LOG_DIR" "$LOG_DIR.prev"; fi
  mkdir -p "$DATA_DIR" "$LOG_DIR"
}

# Starts the node's JVM in the background (not waiting for it); its pid goes to
# PID_FILE and LAUNCHED_PID.
launch_node() {
  local heap extra=()
  read -r -a heap <<< "$KAFKA_HEAP"
  if [[ -n "$KAFKA_OPTS" ]]; then read -r -a extra <<< "$KAFKA_OPTS"; fi
  mkdir -p "$LOG_DIR"
  # setsid + nohup: survives the calling shell/make/pytest. All inherited fds are
  # redirected or closed (fd 9 is the start lock) so callers capturing our output
  # do not hang and the lock is not held by the broker.
  setsid nohup java "${heap[@]}" "${BROKER_JVM_OPTS[@]}" ${extra[@]+"${extra[@]}"} \
    "$PROC_MARKER" \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$LOG_DIR" \
    -cp "$(< "$CLASSPATH_FILE")" kafka.Kafka "$PROPS_FILE" \
    < /dev/null >> "$OUT_FILE" 2>&1 9>&- &
  LAUNCHED_PID=$!
  echo "$LAUNCHED_PID" > "$PID_FILE"
}

status_broker() {
  if port_open "$BROKER_PORT" && ready_check --timeout "${KAFKA_STATUS_TIMEOUT:-15}"; then
    echo "kafka ready on $KAFKA_HOST:$BROKER_PORT ($(describe))"
    return 0
  fi
  echo "kafka not ready on $KAFKA_HOST:$BROKER_PORT ($(describe))"
  return 1
}

# ---------------------------------------------------------------- cluster mode

# Makes node $1 (1..CLUSTER_NODES) the one the functions above work on.
select_node() {
  if ! [[ "$1" =~ ^[1-9]$ ]] || (($1 > CLUSTER_NODES)); then
    die "node must be 1..$CLUSTER_NODES, not '$1'"
  fi
  NODE_ID="$1"
  BROKER_PORT=$((KAFKA_PORT + $1 - 1))
  CONTROLLER_PORT=$((KAFKA_CONTROLLER_PORT + $1 - 1))
  node_paths "$KAFKA_DIR/node-$1"
}

cluster_setup() {
  local n voters=() brokers=()
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    voters+=("$n@$KAFKA_HOST:$((KAFKA_CONTROLLER_PORT + n - 1))")
    brokers+=("$KAFKA_HOST:$((KAFKA_PORT + n - 1))")
  done
  QUORUM_VOTERS="$(IFS=, && echo "${voters[*]}")"
  READY_BOOTSTRAP="$(IFS=, && echo "${brokers[*]}")"
  REPLICATION=3
  MIN_ISR=2
}

cluster_ready_check() {
  ready_check --brokers "$CLUSTER_NODES" --replication-factor "$REPLICATION" "$@"
}

any_broker_port_open() {
  local n
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    port_open $((KAFKA_PORT + n - 1)) && return 0
  done
  return 1
}

# SIGTERM the given nodes' brokers at once, SIGKILL what is left after
# KAFKA_STOP_TIMEOUT. (One at a time, the last two would wait for a controller
# quorum that is gone.)
stop_nodes() {
  local n pid i pids=() nodes=()
  for n in "$@"; do
    select_node "$n"
    if pid="$(our_pid)"; then
      pids+=("$pid")
      nodes+=("$n")
      kill -TERM "$pid" 2> /dev/null || true
    else
      rm -f "$PID_FILE"
    fi
  done
  if ((${#pids[@]} == 0)); then
    log "no node running ($KAFKA_DIR)"
    return 0
  fi
  for ((i = 0; i < KAFKA_STOP_TIMEOUT * 10; i++)); do
    any_alive "${pids[@]}" || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if alive "$pid"; then
      log "broker pid $pid still up after ${KAFKA_STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2> /dev/null || true
    fi
  done
  for ((i = 0; i < 100; i++)); do
    any_alive "${pids[@]}" || break
    sleep 0.1
  done
  any_alive "${pids[@]}" && die "could not kill broker pids ${pids[*]}"
  for n in "${nodes[@]}"; do
    select_node "$n"
    rm -f "$PID_FILE"
  done
  log "stopped nodes ${nodes[*]} (pids ${pids[*]}, $KAFKA_DIR)"
}

any_alive() {
  local pid
  for pid in "$@"; do alive "$pid" && return 0; done
  return 1
}

all_nodes() { seq 1 "$CLUSTER_NODES"; }

cluster_start() {
  local n nodes rc=0
  if any_broker_port_open; then
    cluster_ready_check --timeout 30 --down-grace 2 || rc=$?
    if ((rc == 0)); then
      echo "kafka cluster ready on $READY_BOOTSTRAP [already running]"
      return 0
    fi
  fi
  # Not a ready cluster: whatever of ours runs from KAFKA_DIR goes, anything else
  # on our ports is someone else's.
  mapfile -t nodes < <(all_nodes)
  stop_nodes "${nodes[@]}" 2> /dev/null
  for n in "${nodes[@]}"; do
    select_node "$n"
    port_open "$BROKER_PORT" && die "port $BROKER_PORT (node $n) is in use by something else"
    port_open "$CONTROLLER_PORT" &&
      die "controller port $CONTROLLER_PORT (node $n) is in use (set KAFKA_CONTROLLER_PORT)"
  done
  [[ -z "$KAFKA_EXTRA_PROPS" || -f "$KAFKA_EXTRA_PROPS" ]] ||
    die "KAFKA_EXTRA_PROPS=$KAFKA_EXTRA_PROPS is not a file"
  check_security_settings
  ensure_classpath

  local keep=1 cluster_id=""
  for n in "${nodes[@]}"; do
    select_node "$n"
    [[ "$KAFKA_KEEP_DATA" == 1 && -f "$DATA_DIR/meta.properties" ]] || keep=0
  done
  for n in "${nodes[@]}"; do
    select_node "$n"
    if ((keep)); then
      mkdir -p "$LOG_DIR"
      write_properties
    else
      fresh_node_dirs
      write_properties
      [[ -n "$cluster_id" ]] || cluster_id="$(new_cluster_id)"
      format_storage "$cluster_id"
    fi
  done
  if ((keep)); then log "keeping formatted data in $KAFKA_DIR/node-*/data"; fi

  # All at once: a node alone has no controller quorum and cannot finish starting.
  local pids=() pid_args=()
  for n in "${nodes[@]}"; do
    select_node "$n"
    launch_node
    pids+=("$LAUNCHED_PID")
    pid_args+=(--pid "$LAUNCHED_PID")
  done
  rc=0
  cluster_ready_check --timeout "$KAFKA_READY_TIMEOUT" "${pid_args[@]}" || rc=$?
  if ((rc != 0)); then
    for n in "${nodes[@]}"; do
      select_node "$n"
      show_logs
    done
    stop_nodes "${nodes[@]}" 2> /dev/null || true
    die "cluster on $READY_BOOTSTRAP not ready within ${KAFKA_READY_TIMEOUT}s (rc $rc), stopped it (logs $KAFKA_DIR/node-*/logs)"
  fi
  echo "kafka cluster ready on $READY_BOOTSTRAP (pids ${pids[*]}, dir $KAFKA_DIR)"
}

cluster_stop() {
  local nodes
  mapfile -t nodes < <(all_nodes)
  stop_nodes "${nodes[@]}"
}

cluster_status() {
  local n pid
  for n in $(all_nodes); do
    select_node "$n"
    if pid="$(our_pid)"; then
      echo "node $n: pid $pid, broker $KAFKA_HOST:$BROKER_PORT, controller $CONTROLLER_PORT, log $LOG_FILE"
    else
      echo "node $n: down (broker $KAFKA_HOST:$BROKER_PORT, controller $CONTROLLER_PORT)"
    fi
  done
  if any_broker_port_open && cluster_ready_check --timeout "${KAFKA_STATUS_TIMEOUT:-15}"; then
    echo "kafka cluster ready on $READY_BOOTSTRAP"
    return 0
  fi
  echo "kafka cluster not ready on $READY_BOOTSTRAP"
  return 1
}

node_kill() {
  select_node "$1"
  local pid i
  if ! pid="$(our_pid)"; then
    rm -f "$PID_FILE"
    log "node $1 not running ($NODE_DIR)"
    return 0
  fi
  kill -KILL "$pid" 2> /dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  alive "$pid" && die "could not kill node $1 (pid $pid)"
  rm -f "$PID_FILE"
  echo "killed node $1 (pid $pid, broker $KAFKA_HOST:$BROKER_PORT)"
}

node_stop() { stop_nodes "$1"; }

node_start() {
  select_node "$1"
  local pid rc=0
  if pid="$(our_pid)"; then
    log "node $1 already running (pid $pid)"
  else
    [[ -f "$DATA_DIR/meta.properties" && -f "$PROPS_FILE" ]] ||
      die "node $1 has no formatted data in $NODE_DIR (run cluster-start first)"
    port_open "$BROKER_PORT" && die "port $BROKER_PORT (node $1) is in use by something else"
    port_open "$CONTROLLER_PORT" && die "controller port $CONTROLLER_PORT (node $1) is in use"
    ensure_classpath
    # The same server.properties as before: the node comes back as itself.
    launch_node
    pid="$LAUNCHED_PID"
  fi
  cluster_ready_check --timeout "$KAFKA_READY_TIMEOUT" --in-sync --pid "$pid" || rc=$?
  if ((rc != 0)); then
    show_logs
    die "node $1 (pid $pid) not back in sync within ${KAFKA_READY_TIMEOUT}s (rc $rc, log $LOG_FILE)"
  fi
  echo "node $1 back on $KAFKA_HOST:$BROKER_PORT (pid $pid), all partitions in sync"
}

with_lock() {
  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 9> "$LOCK_FILE"
  flock -w 600 9 || die "timed out waiting for $LOCK_FILE"
  "$@"
}

if ((CLUSTER_MODE)); then cluster_setup; fi
case "${1:-}" in
  start) with_lock start_broker ;;
  stop) with_lock stop_broker ;;
  status) status_broker ;;
  classpath)
    ensure_classpath
    echo "$CLASSPATH_FILE"
    ;;
  cluster-start) with_lock cluster_start ;;
  cluster-stop) with_lock cluster_stop ;;
  cluster-status) cluster_status ;;
  node-kill | node-stop | node-start)
    [[ $# -eq 2 ]] || die "usage: $0 $1 N (N = 1..$CLUSTER_NODES)"
    with_lock "node_${1#node-}" "$2"
    ;;
  *)
    echo "usage: $0 start|stop|status|classpath" >&2
    echo "       $0 cluster-start|cluster-stop|cluster-status" >&2
    echo "       $0 node-kill|node-stop|node-start N" >&2
    exit 2
    ;;
esac
