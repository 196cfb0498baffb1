#!/usr/bin/env bash
# `make k8s-check`: the helm chart checked by a real Kubernetes API server.
#
# kubeconform (make lint-deploy) checks the rendered manifests against JSON schemas; it
# cannot see what only the API server checks (defaulting, cross-field validation, name and
# size limits, CRD schemas, admission). So this starts a throwaway control plane on
# loopback -- etcd from Debian and kube-apiserver built from the Go module proxy
# (scripts/k8s/build.sh) -- and, for every helm/rightfoot-poller/ci/*-values.yaml:
#
#   1. helm template | kubectl apply --dry-run=server --validate=strict --warnings-as-errors
#      (every object through the server's validation and admission; unknown or duplicate
#      fields are errors, and so are warnings, e.g. Pod Security "restricted" violations:
#      every namespace is labelled for that profile)
#   2. helm install, then helm uninstall, and no object of the release may be left over
#
# Before the variants, a canary proves the dry run refuses a broken manifest.
#
# The chart's bare defaults are not a variant: they fail to render on purpose (the API key
# has no default); ci/default-values.yaml is the defaults plus that one key.
#
# No controller-manager, scheduler or kubelet runs: objects are stored, never acted on.
# Prints one PASS/FAIL line per variant and exits non-zero if any failed. etcd and
# kube-apiserver are stopped on exit, whatever happens.
#
# Settings (environment): K8S_CHECK_KEEP=1 keeps the run directory (.run/k8s-check.*)
# with the logs, certificates and etcd data; K8S_CHECK_CHART checks another chart
# directory (e.g. a deliberately broken copy, to see a FAIL).
set -euo pipefail

# The prometheus-operator release whose CRDs (ServiceMonitor, PrometheusRule) are
# installed; read from its Go module zip, which carries example/prometheus-operator-crd/.
PROMETHEUS_OPERATOR_VERSION="v0.94.1"
RELEASE="ci"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="${K8S_CHECK_CHART:-${REPO_ROOT}/helm/rightfoot-poller}"
K8S_CACHE="${REPO_ROOT}/.cache/k8s"
HELM="${REPO_ROOT}/.cache/tools/bin/helm"

RUN_DIR=""          # set by main: .run/k8s-check.XXXXXX
ETCD_PID=""
APISERVER_PID=""
KUBECTL=""          # set by ensure_binaries
APISERVER=""
K8S_VERSION=""
ETCD_URL=""
APISERVER_URL=""
FAILED_STEP=""      # set by step, read by check_all
RESULT_DETAIL=""    # set by check_variant

log() { printf '[k8s-check] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# --- tools ----------------------------------------------------------------------------------

# etcd comes from Debian's etcd-server package (the Makefile's tools-kcat does the same
# for kcat). Its postinst does not start a service in a container without an init system;
# the one started here has its own data directory and ports anyway.
ensure_etcd() {
  command -v etcd >/dev/null 2>&1 && return
  command -v apt-get >/dev/null 2>&1 || die "etcd missing and apt-get unavailable: install etcd 3.4+ by hand"
  local sudo=""
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  log "installing Debian package etcd-server ..."
  ${sudo} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
}

ensure_binaries() {
  [[ -x "${HELM}" ]] || die "helm missing: run \`make tools\` first"
  K8S_VERSION="$("${REPO_ROOT}/scripts/k8s/build.sh")"
  APISERVER="${K8S_CACHE}/kube-apiserver-${K8S_VERSION}"
  KUBECTL="${K8S_CACHE}/kubectl-${K8S_VERSION}"
}

# The CRD manifests, copied out of the Go module cache (the Go module proxy is the one
# place here that serves prometheus-operator's sources).
fetch_crds() {
  local empty dir kind
  empty="$(mktemp -d)"   # outside any module, so no go.mod around us takes part
  dir="$(cd "${empty}" && go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@${PROMETHEUS_OPERATOR_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  rmdir "${empty}"
  [[ -n "${dir}" ]] || die "prometheus-operator ${PROMETHEUS_OPERATOR_VERSION} not downloadable from the Go module proxy"
  mkdir -p "${RUN_DIR}/crds"
  for kind in servicemonitors prometheusrules; do
    cp "${dir}/example/prometheus-operator-crd/monitoring.coreos.com_${kind}.yaml" "${RUN_DIR}/crds/"
  done
}

# --- control plane ------------------------------------------------------------------------

# A port nothing listens on: a connect to it is refused. Random, so that a second run or
# another project's etcd on the default ports does not collide with this one.
free_port() {
  local port
  for _ in {1..50}; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
      echo "${port}"
      return
    fi
  done
  die "no free port found"
}

# A CA, the server's certificate (for 127.0.0.1), an admin client certificate in
# system:masters (RBAC lets that group do anything) and the service-account key pair.
make_certs() {
  local pki="${RUN_DIR}/pki"
  mkdir -p "${pki}"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=k8s-check-ca" \
      -keyout "${pki}/ca.key" -out "${pki}/ca.crt"
    sign_cert apiserver "/CN=kube-apiserver" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost"$'\n'"extendedKeyUsage=serverAuth"
    sign_cert admin "/O=system:masters/CN=k8s-check-admin" "extendedKeyUsage=clientAuth"
    openssl genrsa -out "${pki}/sa.key" 2048
    openssl rsa -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub"
  } >>"${RUN_DIR}/openssl.log" 2>&1
}

sign_cert() {  # sign_cert <name> <subject> <extensions>
  local pki="${RUN_DIR}/pki" name="$1"
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "${pki}/${name}.key" -out "${pki}/${name}.csr"
  openssl x509 -req -in "${pki}/${name}.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" \
    -CAcreateserial -days 2 -extfile <(printf '%s\n' "$3") -out "${pki}/${name}.crt"
}

# Plain HTTP is enough for etcd: it listens on loopback only and holds throwaway data.
start_etcd() {
  local client_port peer_port
  client_port="$(free_port)"
  peer_port="$(free_port)"
  ETCD_URL="http://127.0.0.1:${client_port}"
  etcd --name k8s-check --data-dir "${RUN_DIR}/etcd" --logger=zap --log-outputs=stderr \
    --listen-client-urls "${ETCD_URL}" --advertise-client-urls "${ETCD_URL}" \
    --listen-peer-urls "http://127.0.0.1:${peer_port}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${peer_port}" \
    --initial-cluster "k8s-check=http://127.0.0.1:${peer_port}" \
    >"${RUN_DIR}/etcd.log" 2>&1 &
  ETCD_PID=$!
  wait_for "etcd" 90 curl -fsS "${ETCD_URL}/health"
}

start_apiserver() {
  local pki="${RUN_DIR}/pki" port
  port="$(free_port)"
  APISERVER_URL="https://127.0.0.1:${port}"
  # --endpoint-reconciler-type=none: the `kubernetes` Service's endpoints would point at
  #   this machine's address; nothing here needs them.
  # --service-account-*: required flags; the ServiceAccount admission plugin and token
  #   issuance need the key pair even though no pod ever runs.
  "${APISERVER}" \
    --etcd-servers="${ETCD_URL}" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="${port}" \
    --cert-dir="${pki}" --tls-cert-file="${pki}/apiserver.crt" --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --authorization-mode=RBAC \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none \
    >"${RUN_DIR}/kube-apiserver.log" 2>&1 &
  APISERVER_PID=$!
  write_kubeconfig
  wait_for "kube-apiserver /readyz" 120 "${KUBECTL}" get --raw /readyz
}

# The kubeconfig kubectl and helm use: the admin client certificate, embedded.
write_kubeconfig() {
  local pki="${RUN_DIR}/pki"
  export KUBECONFIG="${RUN_DIR}/kubeconfig"
  {
    "${KUBECTL}" config set-cluster k8s-check --server="${APISERVER_URL}" \
      --certificate-authority="${pki}/ca.crt" --embed-certs
    "${KUBECTL}" config set-credentials admin \
      --client-certificate="${pki}/admin.crt" --client-key="${pki}/admin.key" --embed-certs
    "${KUBECTL}" config set-context k8s-check --cluster=k8s-check --user=admin
    "${KUBECTL}" config use-context k8s-check
  } >/dev/null
}

wait_for() {  # wait_for <what> <seconds> <command...>: until the command succeeds
  local what="$1" timeout="$2" deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "${what} not ready after ${timeout} s; last log lines:"
      tail -n 20 "${RUN_DIR}"/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

stop_process() {  # stop_process <pid>: SIGTERM, then SIGKILL after 10 s
  local pid="$1"
  [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null || return 0
  kill "${pid}" 2>/dev/null || true
  for _ in {1..20}; do
    kill -0 "${pid}" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -9 "${pid}" 2>/dev/null || true
}

cleanup() {
  # A second Ctrl-C or SIGTERM must not cut the cleanup short and orphan etcd.
  trap '' INT TERM
  stop_process "${APISERVER_PID}"
  stop_process "${ETCD_PID}"
  wait 2>/dev/null || true
  if [[ -n "${RUN_DIR}" && "${K8S_CHECK_KEEP:-0}" != 1 ]]; then
    rm -rf "${RUN_DIR}"
  elif [[ -n "${RUN_DIR}" ]]; then
    log "kept ${RUN_DIR}"
  fi
}

# Server-side apply: the CRDs are too big for client-side apply's last-applied annotation.
install_crds() {
  "${KUBECTL}" apply --server-side -f "${RUN_DIR}/crds/" >/dev/null
  # Retried: `kubectl wait` errors out instead of waiting while a new CRD has no status yet.
  wait_for "CRDs established" 60 "${KUBECTL}" wait --for=condition=Established --timeout=5s \
    crd/servicemonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com
}

# A namespace as the controller-manager would leave it: with its `default` ServiceAccount
# (pods that name no ServiceAccount get that one). Labelled for the Pod Security
# "restricted" profile, as a hardened cluster would be: the API server then warns about
# any Deployment whose pods that profile would reject, and the dry run fails on warnings.
ensure_namespace() {
  local ns="$1"
  "${KUBECTL}" get namespace "${ns}" >/dev/null 2>&1 || "${KUBECTL}" create namespace "${ns}" >/dev/null
  "${KUBECTL}" label namespace "${ns}" --overwrite >/dev/null \
    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
  "${KUBECTL}" -n "${ns}" get serviceaccount default >/dev/null 2>&1 ||
    "${KUBECTL}" -n "${ns}" create serviceaccount default >/dev/null
}

# --- the checks ---------------------------------------------------------------------------

step() {  # step <name> <command...>: run it, output indented; a failure names the step
  local name="$1" rc=0 out line
  shift
  out="$("$@" 2>&1)" || rc=$?
  if [[ -n "${out}" ]]; then
    while IFS= read -r line; do printf '    %s\n' "${line}"; done <<<"${out}"
  fi
  if ((rc != 0)); then
    FAILED_STEP="${name}"
    return "${rc}"
  fi
}

# Kinds a release of this chart can create; after `helm uninstall` none may carry its labels.
LEFTOVER_KINDS="deployments,services,configmaps,secrets,serviceaccounts,networkpolicies,poddisruptionbudgets,servicemonitors,prometheusrules"

leftovers() {
  local left
  left="$("${KUBECTL}" get "${LEFTOVER_KINDS}" --all-namespaces -o name \
    -l "app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/managed-by=Helm")"
  [[ -z "${left}" ]] || { printf 'left behind by helm uninstall:\n%s\n' "${left}"; return 1; }
}

# Every object through the server's validation and admission, stored nowhere. Strict:
# unknown or duplicate fields are errors. Warnings (deprecated APIs, Pod Security,
# ignored fields) are errors too.
dry_run() {  # dry_run <manifests>
  "${KUBECTL}" apply --dry-run=server --validate=strict --warnings-as-errors -f "$1"
}

# The check's own check: a dry run that passes everything would pass the chart too. The
# server must refuse an unknown field and a Deployment that breaks the restricted profile.
canary() {
  local ns="rfp-canary" out
  ensure_namespace "${ns}"
  cat >"${RUN_DIR}/canary-field.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: canary, namespace: ${ns}}
data: {key: value}
bogus: true
EOF
  cat >"${RUN_DIR}/canary-pod-security.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: canary, namespace: ${ns}}
spec:
  selector: {matchLabels: {app: canary}}
  template:
    metadata: {labels: {app: canary}}
    spec:
      containers: [{name: canary, image: canary}]
EOF
  out="$(dry_run "${RUN_DIR}/canary-field.yaml" 2>&1)" && return 1
  grep -q 'unknown field "bogus"' <<<"${out}" || { printf '%s\n' "${out}"; return 1; }
  out="$(dry_run "${RUN_DIR}/canary-pod-security.yaml" 2>&1)" && return 1
  grep -q 'would violate PodSecurity "restricted' <<<"${out}" || { printf '%s\n' "${out}"; return 1; }
}

render() {  # render <values file> <namespace> <output file>
  "${HELM}" template "${RELEASE}" "${CHART}" -f "$1" --namespace "$2" \
    --kube-version "${K8S_VERSION}" >"$3"
}

# Every namespace the manifests name: the release's, and e.g. the one a dashboard
# ConfigMap goes to for Grafana's sidecar. They must exist before anything is applied.
create_namespaces() {  # create_namespaces <manifests>
  local namespaces ns
  namespaces="$("${KUBECTL}" create --dry-run=client -f "$1" \
    -o jsonpath='{.metadata.namespace}{"\n"}' | sort -u)" || return 1
  for ns in ${namespaces}; do
    ensure_namespace "${ns}" || return 1
  done
}

check_variant() {  # check_variant <values file> <namespace>
  local values="$1" ns="$2" rendered="${RUN_DIR}/$2.yaml"
  step "helm template" render "${values}" "${ns}" "${rendered}" || return 1
  step "namespaces" create_namespaces "${rendered}" || return 1
  step "server dry-run" dry_run "${rendered}" || return 1
  # The NOTES are left out of the output: tests/test_deploy.py checks them.
  step "helm install" "${HELM}" install "${RELEASE}" "${CHART}" -f "${values}" --namespace "${ns}" \
    --hide-notes || return 1
  step "helm uninstall" "${HELM}" uninstall "${RELEASE}" --namespace "${ns}" || return 1
  step "leftovers" leftovers || return 1
  RESULT_DETAIL="$(grep -c '^kind:' "${rendered}") objects accepted by the server dry-run; helm install and uninstall ok"
}

check_all() {
  local values variant failed=0 passed=0 start
  if step "canary" canary; then
    printf 'PASS %-16s the dry run refuses an unknown field and a pod outside the restricted profile\n' canary
  else
    printf 'FAIL %-16s the dry run let a broken manifest through; no result below can be trusted\n' canary
    failed=1
  fi
  for values in "${CHART}"/ci/*-values.yaml; do
    variant="$(basename "${values}" -values.yaml)"
    printf '== %s (%s) in namespace rfp-%s\n' "${variant}" "${values#"${REPO_ROOT}/"}" "${variant}"
    FAILED_STEP="" RESULT_DETAIL="" start=${SECONDS}
    if check_variant "${values}" "rfp-${variant}"; then
      printf 'PASS %-16s %s (%d s)\n' "${variant}" "${RESULT_DETAIL}" $((SECONDS - start))
      passed=$((passed + 1))
    else
      printf 'FAIL %-16s at step: %s\n' "${variant}" "${FAILED_STEP:-setup}"
      failed=$((failed + 1))
    fi
  done
  printf 'k8s-check: %d passed, %d failed (kube-apiserver %s, etcd %s, prometheus-operator CRDs %s)\n' \
    "${passed}" "${failed}" "${K8S_VERSION}" "$(etcd --version | awk '/etcd Version/ {print $3}')" \
    "${PROMETHEUS_OPERATOR_VERSION}"
  ((failed == 0))
}

main() {
  local start=${SECONDS}
  ensure_etcd
  ensure_binaries
  mkdir -p "${REPO_ROOT}/.run"
  RUN_DIR="$(mktemp -d "${REPO_ROOT}/.run/k8s-check.XXXXXX")"
  trap cleanup EXIT
  trap 'exit 130' INT TERM   # through the EXIT trap, so the servers stop
  fetch_crds
  make_certs
  start_etcd
  start_apiserver
  log "kube-apiserver ${K8S_VERSION} ready at ${APISERVER_URL} after $((SECONDS - start)) s"
  install_crds
  check_all
  log "done in $((SECONDS - start)) s"
}

main "$@"
