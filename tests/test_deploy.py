"""The deployment artefacts: Dockerfile, helm chart, Prometheus alerts, Grafana dashboard.

Everything runs offline against real tools: hadolint, helm, kubeconform (with the
Kubernetes JSON schemas bundled by the kubernetes-validate package) and promtool. A
missing tool fails its test with a pointer to scripts/install-tools.sh; nothing is skipped.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "rightfoot-poller"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TOOLS_BIN = REPO / ".cache" / "tools" / "bin"
SCHEMA_ROOT = REPO / ".cache" / "tools" / "kubernetes-json-schema"
DASHBOARD = REPO / "dashboards" / "rightfoot-poller.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
INSTALL_HINT = "run `bash scripts/install-tools.sh` (or `make tools`) first"
# kubeconform's path template into the schemas prepared by scripts/install-tools.sh.
SCHEMA_LOCATION = str(SCHEMA_ROOT) + (
    "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
    "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
)

# Custom resources: no schema in the Kubernetes set; checked by hand below.
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}
# Strings the ci values files use as credentials; they must never leave the Secret.
CI_SECRETS = ("ci-api-key", "ci-admin-token", "ci-sasl-password", "ci-registry-password")
RELEASE = "ci"
NAMESPACE = "payments"


# --- helpers ------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of a tool: the project's tool dir, the virtualenv, then PATH."""
    for candidate in (TOOLS_BIN / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return found


def run(
    args: list[str], *, input: str | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, input=input, capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )
    if ok and result.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def kube_versions() -> list[str]:
    versions = sorted(
        (
            d.name.removeprefix("v").removesuffix("-standalone-strict")
            for d in SCHEMA_ROOT.glob("v*-standalone-strict")
            if (d / ".complete").exists()
        ),
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    if not versions:
        pytest.fail(f"no Kubernetes JSON schemas in {SCHEMA_ROOT}: {INSTALL_HINT}")
    return versions


@functools.cache
def render(values: Path, kube_version: str | None = None, *extra: str) -> str:
    args = [
        tool("helm"),
        "template",
        RELEASE,
        str(CHART),
        "-n",
        NAMESPACE,
        "-f",
        str(values),
        *extra,
    ]
    if kube_version:
        args += ["--kube-version", kube_version]
    return run(args).stdout


def documents(values: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(values)) if d]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def ci(name: str) -> Path:
    path = CHART / "ci" / f"{name}-values.yaml"
    assert path.exists(), path
    return path


def values_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def rendered_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"])
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return config


def default_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def test_ci_variants_exist() -> None:
    names = {values_id(p) for p in CI_VALUES}
    assert {
        "default",
        "existing-secret",
        "monitoring",
        "networkpolicy",
        "sasl-ssl",
        "schema-registry",
        "single-replica",
    } <= names


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    run([tool("hadolint"), "--failure-threshold", "warning", "Dockerfile"])


def test_dockerfile_installs_locked_dependencies_then_project_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert len(froms) == 2, froms
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert '"uv==${UV_VERSION}"' in text and "ARG UV_VERSION=0.13.8" in text
    deps = next(i for i, line in enumerate(instructions) if "--no-install-project" in line)
    source = next(i for i, line in enumerate(instructions) if line.startswith("COPY service/"))
    project = next(i for i, line in enumerate(instructions) if "--no-editable" in line)
    assert deps < source < project
    # the simulator behind `rightfoot-poller simulate` is a package of its own
    simulator = instructions.index("COPY rightfoot_simulator/ ./rightfoot_simulator/")
    assert deps < simulator < project
    assert "uv sync --frozen --no-dev --no-install-project" in instructions[deps]
    assert "--mount=type=cache" in instructions[deps]
    runtime = instructions[instructions.index(froms[1]) :]
    assert any(line.startswith("COPY --from=builder /app/.venv") for line in runtime)
    assert not any(line.startswith("COPY service") for line in runtime)
    assert "USER 10001:10001" in runtime
    assert 'ENTRYPOINT ["rightfoot-poller"]' in runtime
    assert 'CMD ["run", "--config", "/etc/rightfoot-poller/config.yaml"]' in runtime
    assert "EXPOSE 8080" in runtime
    assert "PYTHONDONTWRITEBYTECODE=1" in text and "PYTHONUNBUFFERED=1" in text
    assert "org.opencontainers.image.source" in text or "org.opencontainers.image.title" in text


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern that matches a
    directory matches everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".run/x",
        ".cache/tools/bin/helm",
        "tests/test_deploy.py",
        "helm/rightfoot-poller/values.yaml",
        ".env",
        "service/__pycache__/app.cpython-311.pyc",
        "rightfoot_simulator/__pycache__/api.cpython-311.pyc",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the docker build"
    for path in (
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "config.yaml",
        "service/app.py",
        "rightfoot_simulator/server.py",
        "schemas/balance-event.schema.json",
    ):
        assert not dockerignored(path, patterns), f"{path} is needed by the Dockerfile"


# --- helm chart: lint, schema validation --------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_helm_lint(values: Path) -> None:
    run([tool("helm"), "lint", "--strict", str(CHART), "-f", str(values)])


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_rendered_manifests_match_kubernetes_schemas(values: Path) -> None:
    kubeconform = tool("kubeconform")
    for version in kube_versions():
        manifests = render(values, version)
        docs = [d for d in yaml.safe_load_all(manifests) if d]
        custom = [d for d in docs if d["kind"] in CUSTOM_KINDS]
        result = run(
            [
                kubeconform,
                "-strict",
                "-summary",
                "-output",
                "json",
                "-kubernetes-version",
                version,
                "-schema-location",
                SCHEMA_LOCATION,
                "-skip",
                ",".join(CUSTOM_KINDS),
                "-",
            ],
            input=manifests,
        )
        summary = json.loads(result.stdout)["summary"]
        assert summary == {
            "valid": len(docs) - len(custom),
            "invalid": 0,
            "errors": 0,
            "skipped": len(custom),
        }, f"Kubernetes {version}: {result.stdout}"


def test_schema_validation_catches_an_invalid_manifest() -> None:
    """The offline schemas really are applied (not silently missing)."""
    version = kube_versions()[-1]
    bad = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {ports: [{port: http}], bogus: 1}\n"
    )
    result = run(
        [
            tool("kubeconform"),
            "-strict",
            "-kubernetes-version",
            version,
            "-schema-location",
            SCHEMA_LOCATION,
            "-",
        ],
        input=bad,
        ok=False,
    )
    assert result.returncode != 0
    assert "bogus" in result.stdout and "want integer" in result.stdout, result.stdout


def test_custom_resources_are_well_formed() -> None:
    docs = documents(ci("monitoring"))
    service = only(docs, "Service")
    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == CUSTOM_KINDS["ServiceMonitor"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    rule = only(docs, "PrometheusRule")
    assert rule["apiVersion"] == CUSTOM_KINDS["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text()), (
        "PrometheusRule differs from alerts.yaml"
    )

    dashboard = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["rightfoot-poller.json"]) == json.loads(
        DASHBOARD.read_text()
    )


def test_custom_resources_are_opt_in() -> None:
    kinds = {d["kind"] for d in documents(ci("default"))}
    assert kinds == {
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    }


# --- helm chart: what the pods get -------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_pods_run_locked_down(values: Path) -> None:
    docs = documents(values)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    sa = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert all(d["automountServiceAccountToken"] is False for d in sa)


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_pods_are_wired_to_the_service(values: Path) -> None:
    docs = documents(values)
    deployment = only(docs, "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    config = rendered_config(docs)

    assert container["args"] == ["run", "--config", "/etc/rightfoot-poller/config.yaml"]
    assert container["ports"] == [
        {"name": "http", "containerPort": config["http"]["port"], "protocol": "TCP"}
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > config["shutdown_grace_s"]
    assert re.fullmatch(r"[0-9a-f]{64}", template["metadata"]["annotations"]["checksum/config"])
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()

    env = {e["name"]: e for e in container["env"]}
    assert env["RFP_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["RFP_HTTP__ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert ("RIGHTFOOT_API_KEY" in env) != ("RIGHTFOOT_API_KEY_FILE" in env)
    for variable in env.values():
        assert "value" not in variable or not any(s in variable["value"] for s in CI_SECRETS)

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes[mounts["/etc/rightfoot-poller"]["name"]]["configMap"]["name"]
        == deployment["metadata"]["name"]
    )
    if "RIGHTFOOT_API_KEY_FILE" in env:
        key_file = Path(env["RIGHTFOOT_API_KEY_FILE"]["value"])
        assert volumes[mounts[str(key_file.parent)]["name"]]["secret"]
    # Every file the config names is mounted.
    for path in (
        config["kafka"].get("ssl_cafile"),
        config["kafka"].get("ssl_certfile"),
        config["kafka"].get("ssl_keyfile"),
        config["rightfoot"].get("ca_bundle"),
        config.get("schema_registry", {}).get("ssl_cafile"),
        config.get("schema_registry", {}).get("ssl_certfile"),
        config.get("schema_registry", {}).get("ssl_keyfile"),
    ):
        if path:
            assert str(Path(path).parent) in mounts, f"{path} is not mounted"


def test_pod_selector_matches_service_and_pdb() -> None:
    docs = documents(ci("default"))
    selector = only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert only(docs, "Service")["spec"]["selector"] == selector
    assert only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_pdb_with_three_replicas_and_none_with_one() -> None:
    docs = documents(ci("default"))
    assert only(docs, "Deployment")["spec"]["replicas"] == 3
    # Readiness is red by design while the API key is rejected or Kafka is unreachable:
    # with the default policy (IfHealthyBudget) no such pod could be evicted, and a node
    # drain would wait for the incident to end.
    assert only(docs, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": only(docs, "Deployment")["spec"]["selector"],
    }
    single = documents(ci("single-replica"))
    assert only(single, "Deployment")["spec"]["replicas"] == 1
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"]


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_no_secret_in_configmaps(values: Path) -> None:
    docs = documents(values)
    config = rendered_config(docs)
    for section, key in (
        ("rightfoot", "api_key"),
        ("http", "admin_token"),
        ("kafka", "sasl_password"),
        ("schema_registry", "password"),
    ):
        assert key not in config.get(section, {})
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not [s for s in CI_SECRETS if s in text], (
                f"a credential leaked into {doc['kind']}"
            )


def test_chart_secret_holds_the_credentials_and_existing_secret_skips_it() -> None:
    secret = only(documents(ci("sasl-ssl")), "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "apiKey": "ci-api-key",
        "adminToken": "ci-admin-token",
        "kafkaSaslPassword": "ci-sasl-password",
    }

    docs = documents(ci("existing-secret"))
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = {
        e["name"]: e
        for e in only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RIGHTFOOT_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "rightfoot-credentials",
        "key": "apiKey",
    }


def test_sasl_ssl_variant_delivers_password_and_tls_files() -> None:
    docs = documents(ci("sasl-ssl"))
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RFP_KAFKA__SASL_PASSWORD_FILE"]["value"].endswith("/kafkaSaslPassword")
    kafka = rendered_config(docs)["kafka"]
    assert kafka["security_protocol"] == "SASL_SSL" and kafka["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kafka["ssl_cafile"].endswith("/ca.crt") and kafka["ssl_keyfile"].endswith("/tls.key")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "rightfoot-poller-kafka-tls"
    assert (
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
        == (only(docs, "Deployment")["spec"]["selector"]["matchLabels"])
    )


def test_schema_registry_variant_delivers_password_tls_and_egress() -> None:
    docs = documents(ci("schema-registry"))
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    password_file = Path(env["RFP_SCHEMA_REGISTRY__PASSWORD_FILE"]["value"])
    assert password_file.name == "schemaRegistryPassword"
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = only(docs, "Secret")
    assert (
        volumes[mounts[str(password_file.parent)]["name"]]["secret"]["secretName"]
        == (secret["metadata"]["name"])
    )
    assert base64.b64decode(secret["data"]["schemaRegistryPassword"]) == b"ci-registry-password"
    config = rendered_config(docs)
    assert config["kafka"]["value_format"] == "json_sr"
    registry = config["schema_registry"]
    assert registry["url"] == "https://schema-registry.kafka.svc:8081"
    assert registry["auto_register"] is False and registry["username"] == "rightfoot-poller"
    assert registry["ssl_cafile"].endswith("/schema-registry-tls/ca.crt")
    assert "ssl_certfile" not in registry and "ssl_keyfile" not in registry
    assert volumes["schema-registry-tls"]["secret"]["secretName"] == "schema-registry-ca"
    policy = only(docs, "NetworkPolicy")["spec"]
    egress_ports = [sorted(p["port"] for p in rule["ports"]) for rule in policy["egress"]]
    assert egress_ports == [[53, 53], [9092, 9093], [8081], [443]]
    assert policy["egress"][2]["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}
    ]

    # In "env" mode the password is an environment variable from the Secret instead.
    docs = [
        d
        for d in yaml.safe_load_all(
            render(ci("schema-registry"), None, "--set", "secrets.mode=env")
        )
        if d
    ]
    env = {
        e["name"]: e
        for e in only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "RFP_SCHEMA_REGISTRY__PASSWORD_FILE" not in env
    assert env["RFP_SCHEMA_REGISTRY__PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == (
        "schemaRegistryPassword"
    )

    # The default stays plain JSON: no registry password, no registry egress rule.
    default = documents(ci("default"))
    assert rendered_config(default)["kafka"]["value_format"] == "json"
    names = {
        e["name"]
        for e in only(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert not {"RFP_SCHEMA_REGISTRY__PASSWORD", "RFP_SCHEMA_REGISTRY__PASSWORD_FILE"} & names


def test_network_policy_allows_only_what_the_service_needs() -> None:
    docs = documents(ci("networkpolicy"))
    policy = only(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in ingress["from"]
    egress_ports = [sorted(p["port"] for p in rule["ports"]) for rule in policy["egress"]]
    assert egress_ports == [[53, 53], [9093], [443]]
    assert not [d for d in documents(ci("default")) if d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--set", "config.kafka.delivery=maybe"], "delivery"),
        (["--set", "config.kafka.security_protocol=TLS"], "security_protocol"),
        (["--set", "config.rightfoot.api_key=oops"], "api_key"),
        (["--set", "config.http.admin_token=oops"], "admin_token"),
        (["--set", "terminationGracePeriodSeconds=15"], "shutdown_grace_s"),
        (["--set", "secrets.apiKey="], "secrets.apiKey"),
        (["--set", "kafkaTls.enabled=true"], "kafkaTls.secretName"),
        (["--set", "config.kafka.value_format=avro"], "value_format"),
        (["--set", "config.kafka.value_format=json_sr"], "schema_registry/url"),
        (["--set", "config.schema_registry.password=oops"], "password"),
        (["--set", "config.schema_registry.username=u"], "secrets.schemaRegistryPassword"),
        (
            [
                *("--set", "config.kafka.security_protocol=SASL_SSL"),
                *("--set", "config.kafka.sasl_mechanism=PLAIN"),
                *("--set", "config.kafka.sasl_username=u"),
            ],
            "secrets.kafkaSaslPassword",
        ),
        (["--set", "schemaRegistryTls.enabled=true"], "schemaRegistryTls.secretName"),
        (["--set", "unknownValue=1"], "unknownValue"),
    ],
)
def test_bad_values_are_refused(setting: list[str], message: str) -> None:
    result = run(
        [tool("helm"), "template", RELEASE, str(CHART), "-f", str(ci("default")), *setting],
        ok=False,
    )
    assert result.returncode != 0, f"{setting} was accepted"
    assert message in result.stderr, result.stderr


def test_notes_render_with_scaling_advice(tmp_path: Path) -> None:
    """NOTES.txt renders (helm template leaves it out, so render it as a manifest of a
    copy of the chart) and states the per-replica API budget and the partition ceiling."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "NOTES.txt")
    (chart / "templates" / "notes-check.yaml").write_text(
        'notes: |\n  {{- tpl (.Files.Get "files/NOTES.txt") . | nindent 2 }}\n'
    )
    args = ["-f", str(ci("default")), "--show-only", "templates/notes-check.yaml"]
    helm = tool("helm")
    notes = yaml.safe_load(
        run([helm, "template", RELEASE, str(chart), "--set", "replicaCount=14", *args]).stdout
    )["notes"]
    assert "20 req/s per replica, 280 req/s in total" in notes
    assert "replicaCount (14) exceeds config.kafka.partitions (12)" in notes
    notes = yaml.safe_load(run([helm, "template", RELEASE, str(chart), *args]).stdout)["notes"]
    assert "WARNING" not in notes and "60 req/s in total" in notes


# --- helm chart vs the service's own configuration -------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_rendered_config_is_accepted_by_the_service(values: Path, tmp_path: Path) -> None:
    from certs import CertificateAuthority

    from service.config import load_settings

    docs = documents(values)
    config = rendered_config(docs)
    # Paths in the pod (mounted Secrets); the service checks at start that each file loads
    # (a CA bundle, a client certificate and its key), so real ones stand in for them here.
    ca = CertificateAuthority(tmp_path)
    client = ca.issue("client", server=False)
    stand_ins = {"ca_bundle": ca.cert, "ssl_cafile": ca.cert}
    stand_ins |= {"ssl_certfile": client.cert, "ssl_keyfile": client.key}
    for section in ("rightfoot", "kafka", "schema_registry"):
        for key, stand_in in stand_ins.items():
            if config.get(section, {}).get(key):
                config[section][key] = str(stand_in)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"RFP_INSTANCE_ID": "ci-0", "RIGHTFOOT_API_KEY": "k", "RFP_KAFKA__SASL_PASSWORD": "p"}
    if rendered_config(docs).get("schema_registry", {}).get("username"):
        env["RFP_SCHEMA_REGISTRY__PASSWORD"] = "p"  # the pod gets it from the Secret
    settings = load_settings(path, env=env)
    assert settings.instance_id == "ci-0"


def test_values_config_defaults_are_the_services_defaults() -> None:
    from service.config import Settings

    defaults = Settings(instance_id="x").model_dump(mode="json")
    config = default_values()["config"]
    differ = {}
    for section, block in config.items():
        items = block.items() if isinstance(block, dict) else [(None, block)]
        for key, value in items:
            expected = defaults[section] if key is None else defaults[section][key]
            name = section if key is None else f"{section}.{key}"
            if value in ("", None) or name == "kafka.bootstrap_servers":
                continue
            if value != expected:
                differ[name] = (value, expected)
    assert not differ, (
        f"values.yaml config differs from the service's defaults (values, service): {differ}"
    )


def test_values_schema_allows_only_real_non_secret_config_keys() -> None:
    from service.config import SECRET_KEYS, Settings

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    config = schema["properties"]["config"]
    fields = Settings.model_fields
    for section, spec in config["properties"].items():
        assert section in fields, f"config.{section} is not a service setting"
        if spec.get("type") == "object":
            model = type(getattr(Settings(instance_id="x"), section))
            for key in spec["properties"]:
                assert key in model.model_fields, f"config.{section}.{key} is not a service setting"
                assert (section, key) not in SECRET_KEYS
            assert spec["additionalProperties"] is False
    assert "instance_id" not in config["properties"]
    kafka = config["properties"]["kafka"]["properties"]
    assert kafka["delivery"]["enum"] == ["exactly_once", "at_least_once"]
    assert kafka["security_protocol"]["enum"] == ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
    assert kafka["value_format"]["enum"] == ["json", "json_sr"]


# Values that are Kubernetes objects passed through as they are: documented as a whole.
LITERAL_VALUES = {
    "podSecurityContext",
    "securityContext",
    "resources",
    "updateStrategy",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "constraints",
    "namespaceSelectors",
    "namespaceSelector",
    "podSelector",
    "to",
}


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a comment right above it, except inside values that
    are Kubernetes objects passed through (documented as a whole)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_literal = any(parent in LITERAL_VALUES for _, parent in stack)
        stack.append((indent, key))
        if not inside_literal and not lines[i - 1].strip().startswith("#"):
            undocumented.append(".".join(k for _, k in stack))
    assert not undocumented, f"values without a comment: {undocumented}"


# --- Prometheus rules -------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    run([tool("promtool"), "test", "rules", str(ALERT_TESTS)])


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {name.removeprefix("alert:") for name, _ in promql.alert_expressions()}
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"
    required = {
        "RightfootApiErrorsHigh",
        "RightfootApiUnauthorized",
        "RightfootPollingStalled",
        "RightfootPublishFailures",
        "RightfootNoReadyReplica",
    }
    assert required <= alerts


def test_alerts_have_severity_summary_description_runbook() -> None:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        assert group["name"] == "rightfoot-poller"
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule[
                "alert"
            ]


# --- copies in the chart ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "copy"),
    [
        (ALERTS, CHART / "files" / "alerts.yaml"),
        (DASHBOARD, CHART / "files" / "rightfoot-poller.json"),
    ],
    ids=["alerts", "dashboard"],
)
def test_chart_copies_are_identical(original: Path, copy: Path) -> None:
    assert copy.read_bytes() == original.read_bytes(), (
        f"{copy.relative_to(REPO)} differs from {original.relative_to(REPO)}: "
        "run `make sync-deploy-copies`"
    )


# --- Grafana dashboard ------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = promql.dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: target without expr"
            assert target["datasource"]["uid"] == "${datasource}"
    sources = [source for source, _ in promql.dashboard_expressions()]
    assert len(sources) == len(set(sources)), "panel titles/refIds are not unique"


def test_dashboard_covers_the_operational_questions() -> None:
    used = set().union(*(promql.metric_names(e) for _, e in promql.dashboard_expressions()))
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = promql.METRICS - bases
    assert not missing, f"metrics on no dashboard panel: {missing}"


def test_expressions_use_only_exported_metrics() -> None:
    unknown = {
        source: sorted(promql.unknown_metrics(expr)) for source, expr in promql.all_expressions()
    }
    assert not {s: u for s, u in unknown.items() if u}
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        for name in re.findall(r"label_values\((\w+)", variable.get("definition", "")):
            assert name in promql.METRICS, f"variable {variable['name']} queries {name}"


def test_expressions_parse_as_promql() -> None:
    expressions = promql.all_expressions()
    assert len(expressions) > 20
    promql.promtool_check(expressions, promtool=tool("promtool"))


def test_metric_list_matches_what_the_service_exports() -> None:
    from service.metrics import Metrics

    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert not promql.METRICS - exported, (
        f"dashboards/alerts expect metrics the service lacks: {promql.METRICS - exported}"
    )


# The `code` label of rightfoot_poller_api_requests_total as the service sets it
# (service/api.py): an HTTP status, or one of the literals it assigns when no answer came.
# The export CLI's own codes (malformed, truncated) are never scraped.
API_CODE_MATCHER = re.compile(
    r'rightfoot_poller_api_requests_total\{[^}]*?\bcode\s*(=~|!~|=|!=)\s*"((?:[^"\\]|\\.)*)"'
)


def service_api_codes() -> set[str]:
    source = (REPO / "service" / "api.py").read_text()
    literals = set(re.findall(r'\bcode = "(\w+)"', source))
    assert {"timeout", "connection_error", "error"} <= literals, literals
    return literals | {str(status) for status in range(100, 600)}


def test_api_code_matchers_name_codes_the_service_sends() -> None:
    codes = service_api_codes()
    matchers = [
        (source, value)
        for source, expr in promql.all_expressions()
        for _, value in API_CODE_MATCHER.findall(expr)
    ]
    assert matchers, "no expression selects API requests by code"
    unknown = {
        f"{source}: {alternative}"
        for source, value in matchers
        for alternative in value.split("|")
        if not any(re.fullmatch(alternative, code) for code in codes)
    }
    assert not unknown, f"codes the service never sends: {sorted(unknown)}"


def test_api_error_ratio_counts_every_request_without_a_good_answer() -> None:
    (panel,) = [p for p in promql.dashboard_panels() if p["title"] == "API error ratio"]
    errors = next(t["expr"] for t in panel["targets"] if t["refId"] == "A")
    (matcher,) = {v for op, v in API_CODE_MATCHER.findall(errors) if op == "=~"}
    failures = {c for c in service_api_codes() if not c.isdigit()} | {"500", "503", "599"}
    answered = {"200", "400", "401", "403", "404", "429", "499"}
    assert {c for c in failures if not re.fullmatch(matcher, c)} == set()
    assert {c for c in answered if re.fullmatch(matcher, c)} == set()


# --- chart values against the service and its documentation ----------------------------


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (256Mi, 1Gi, 300M, 268435456) in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    assert match, quantity
    number, unit = float(match.group(1)), match.group(2) or ""
    factor = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(unit)
    if factor is None:
        factor = 1024 ** ("KMGT".index(unit[0]) + 1)
    return number * factor / 2**20


def test_memory_request_covers_the_documented_peak_at_default_settings() -> None:
    # docs/performance.md measures the peak RSS for a few max_records_in_flight values;
    # the row of the default is the one the chart's request must cover.
    performance = (REPO / "docs" / "performance.md").read_text()
    match = re.search(
        r"^\| ([\d,]+) \(the default\) \|[^|\n]*\|[^|\n]*\| (\d+) MiB \|$", performance, re.M
    )
    assert match, "docs/performance.md has no peak RSS for the default max_records_in_flight"
    in_flight, peak = int(match.group(1).replace(",", "")), int(match.group(2))
    values = default_values()
    assert values["config"]["polling"]["max_records_in_flight"] == in_flight
    docs = documents(ci("default"))
    (container,) = [
        c
        for c in only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        if c["name"] == "rightfoot-poller"
    ]
    resources = container["resources"]
    assert resources == values["resources"]
    request = mebibytes(resources["requests"]["memory"])
    assert peak <= request <= mebibytes(resources["limits"]["memory"])


def test_values_say_where_the_logs_go() -> None:
    logs = (REPO / "service" / "logs.py").read_text()
    (stream,) = re.findall(r"StreamHandler\(stream or sys\.(stdout|stderr)\)", logs)
    lines = (CHART / "values.yaml").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip() == "logging:")
    comment = lines[index - 1]
    assert comment.lstrip().startswith("#") and "Logs" in comment, comment
    other = {"stdout", "stderr"} - {stream}
    assert stream in comment and not other & set(re.findall(r"\w+", comment)), comment
