#!/usr/bin/env bash
# Builds the pinned kube-apiserver and kubectl from the Go module proxy into .cache/k8s:
#
#   .cache/k8s/kube-apiserver-<K8S_VERSION>
#   .cache/k8s/kubectl-<K8S_VERSION>
#
# Idempotent: binaries already built for the pinned version are left alone, so only the
# first run pays for the build. Measured: 12 min on 2 cores shared with other jobs, for
# 7 CPU-minutes (so about 4 min on 2 idle cores) and 1.9 GB of RAM at peak. No package ships
# kube-apiserver, and GitHub release downloads are not reachable here; see go.mod.in for
# why it takes a module of our own. kubectl is built too, because the image's kubectl
# (Google Cloud SDK, newest 1.33) is outside kubectl's +/-1 minor version skew for 1.36.
#
# Prints the pinned version on stdout (the binaries are named after it); logs go to stderr.
set -euo pipefail

# The Kubernetes release to build; its staging modules are published as v0.<minor>.<patch>.
K8S_VERSION="v1.36.5"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${REPO_ROOT}/.cache/k8s"
BUILD_DIR="${OUT_DIR}/build-${K8S_VERSION}"
TEMPLATE="${REPO_ROOT}/scripts/k8s/go.mod.in"
BINARIES=(kube-apiserver kubectl)

log() { printf '[k8s-build] %s\n' "$*" >&2; }

already_built() {
  local bin
  for bin in "${BINARIES[@]}"; do
    [[ -x "${OUT_DIR}/${bin}-${K8S_VERSION}" ]] || return 1
  done
}

# `go mod download -json` of k8s.io/kubernetes, run outside any module (an empty
# directory) so that no go.mod around us takes part.
kubernetes_module_json() {
  local empty
  empty="$(mktemp -d)"
  (cd "${empty}" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}")
  rmdir "${empty}"
}

json_field() {  # json_field <name> < json: the first string value of "name"
  sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",*\$/\1/p" | head -n1
}

# One `k8s.io/x => k8s.io/x v0.M.P` line per staging module that Kubernetes both requires
# and replaces with ./staging/src/...: the replace block also names modules nobody
# requires (sample-cli-plugin, sample-controller) that are not published for every patch.
staging_replaces() {
  local upstream_gomod="$1" staging_version="$2"
  awk -v ver="${staging_version}" '
    $1 == "require" && $2 == "(" { in_require = 1; next }
    $1 == "replace" && $2 == "(" { in_replace = 1; next }
    $1 == ")" { in_require = 0; in_replace = 0; next }
    in_require { required[$1] = 1 }
    in_replace && $2 == "=>" && $3 ~ /^\.\/staging\// { staged[$1] = 1 }
    END {
      for (m in staged) if (m in required) printf "\t%s => %s %s\n", m, m, ver
    }' "${upstream_gomod}" | sort
}

write_gomod() {
  local upstream_gomod="$1" staging_version replaces
  staging_version="v0.${K8S_VERSION#v1.}"            # v1.36.5 -> v0.36.5
  replaces="$(staging_replaces "${upstream_gomod}" "${staging_version}")"
  log "$(grep -c '=>' <<<"${replaces}") staging modules replaced with ${staging_version}"
  mkdir -p "${BUILD_DIR}"
  awk -v ver="${K8S_VERSION}" -v replaces="${replaces}" '
    /@STAGING_REPLACES@/ { print replaces; next }
    { gsub(/@K8S_VERSION@/, ver); print }' "${TEMPLATE}" >"${BUILD_DIR}/go.mod"
}

# The version stamps Kubernetes' own build sets (hack/lib/version.sh). Without them the
# server reports v0.0.0-master, and helm rejects the chart's `kubeVersion: >=1.29.0-0`.
version_ldflags() {
  local commit="$1" minor flags="" pkg key val
  minor="$(cut -d. -f2 <<<"${K8S_VERSION}")"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for key in gitVersion:"${K8S_VERSION}" gitMajor:1 gitMinor:"${minor}" \
               gitCommit:"${commit}" gitTreeState:clean; do
      val="${key#*:}"
      flags+=" -X ${pkg}.${key%%:*}=${val}"
    done
  done
  printf '%s' "-s -w${flags}"
}

build() {
  local module_json upstream_gomod commit start bin
  log "building kube-apiserver and kubectl ${K8S_VERSION} with $(go version | awk '{print $3}') ..."
  start=${SECONDS}
  module_json="$(kubernetes_module_json)"
  upstream_gomod="$(json_field GoMod <<<"${module_json}")"
  commit="$(json_field Hash <<<"${module_json}")"
  write_gomod "${upstream_gomod}"
  (
    cd "${BUILD_DIR}"
    GOFLAGS=-mod=mod go mod tidy
    # Both in one `go build`, so the packages they share compile once.
    CGO_ENABLED=0 go build -trimpath -ldflags "$(version_ldflags "${commit}")" -o "${BUILD_DIR}/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
  )
  for bin in "${BINARIES[@]}"; do
    mv "${BUILD_DIR}/bin/${bin}" "${OUT_DIR}/${bin}-${K8S_VERSION}"
  done
  log "built in $((SECONDS - start)) s: ${OUT_DIR}/{kube-apiserver,kubectl}-${K8S_VERSION}"
}

main() {
  command -v go >/dev/null 2>&1 || { log "Go is required to build kube-apiserver; not found on PATH"; exit 1; }
  mkdir -p "${OUT_DIR}"
  if already_built; then
    log "kube-apiserver and kubectl ${K8S_VERSION} already built"
  else
    build
  fi
  printf '%s\n' "${K8S_VERSION}"
}

main "$@"
