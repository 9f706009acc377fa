"""deploy/helm/enclave: `helm lint --strict`, `helm template` under the default and a scaled-out
set of values, and every rendered object validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors) for the Kubernetes version the chart targets.

What is validated exactly:
- helm 4 (scripts/ensure-helm.sh; the official linux-amd64 build shipped by an npm package) lints
  and renders the chart: template syntax, required values, the chart's own `fail` guards;
- every built-in kind (Deployment, Service, Ingress, PVC, CronJob, NetworkPolicy, Secret,
  ConfigMap) against the Kubernetes 1.33 JSON schemas, strict;
- the ServiceMonitor (a Prometheus Operator CRD, for which no schema ships) for the fields
  Prometheus needs: port, path, bearer-token Secret reference matching the chart's Secret;
- the semantics this project relies on (schedule, TLS, non-root, probes, config file content).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

CHART = REPO / "deploy" / "helm" / "enclave"
K8S_VERSION = "1.33.0"
SECRETS = ["--set", "secrets.apiKeySecret=test-secret", "--set", "secrets.metricsToken=test-metrics-token"]


def helm() -> str:
    found = shutil.which("helm") or (str(REPO / "var/tools/helm/helm") if (REPO / "var/tools/helm/helm").exists() else None)
    if found is None:
        pytest.fail("helm not found: run `make test` (scripts/ensure-helm.sh installs it into var/tools/helm)")
    return found


def run_helm(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def render(*values: str) -> list[dict]:
    out = run_helm("template", "enclave", str(CHART), "--namespace", "enclave", *SECRETS, *values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


SCALED = ["--set", "replicaCount=3", "--set", "secrets.databaseUrl=postgresql+psycopg://enclave:pw@postgres:5432/enclave",
          "--set", "persistence.data.accessModes={ReadWriteMany}", "--set", "config.generation.engine=openai",
          "--set", "config.generation.openai_base_url=http://vllm:8000/v1", "--set", "config.generation.openai_model=glm-4-9b-chat"]


def test_chart_lints():
    run_helm("lint", str(CHART), "--strict", *SECRETS)


@pytest.mark.parametrize("values", [[], SCALED], ids=["default", "scaled-out"])
def test_rendered_objects_validate_against_the_kubernetes_schemas(values):
    docs = render(*values)
    kinds = by_kind(docs)
    assert set(kinds) == {"Deployment", "Service", "Ingress", "PersistentVolumeClaim", "CronJob", "NetworkPolicy",
                          "Secret", "ConfigMap", "ServiceMonitor"}
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")

    monitor = kinds["ServiceMonitor"][0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoint = monitor["spec"]["endpoints"][0]
    secret = kinds["Secret"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": secret["metadata"]["name"], "key": "metrics-token"}
    assert secret["stringData"]["metrics-token"] == "test-metrics-token"
    service = kinds["Service"][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_semantics_of_the_default_chart():
    kinds = by_kind(render())
    cron = kinds["CronJob"][0]
    assert cron["spec"]["schedule"] == "0 2 1 1,4,7,10 *"
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["enclave", "finetune", "run"]

    ingress = kinds["Ingress"][0]
    assert ingress["spec"]["tls"][0]["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    paths = {p["path"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert "/v1" in paths and "/metrics" not in paths

    assert {p["metadata"]["name"] for p in kinds["PersistentVolumeClaim"]} == {"enclave-data", "enclave-models"}

    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Selectors: the Service reaches the API pods, never the fine-tuning job's.
    service_selector = kinds["Service"][0]["spec"]["selector"]
    assert service_selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    job_labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not service_selector.items() <= job_labels.items()

    # The rendered config is a valid Enclave configuration.
    from app.settings import Settings

    config = yaml.safe_load(kinds["ConfigMap"][0]["data"]["enclave.yaml"])
    settings = Settings(**config)
    assert settings.server.host == "0.0.0.0" and settings.logging.format == "json"


def test_scaled_out_chart_and_its_guards():
    kinds = by_kind(render(*SCALED))
    assert kinds["Deployment"][0]["spec"]["replicas"] == 3
    egress_ports = {p["port"] for rule in kinds["NetworkPolicy"][0]["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5432, 8000} <= egress_ports  # DNS, PostgreSQL, vLLM
    # Several replicas without PostgreSQL, or without shared storage, are refused at render time.
    no_db = run_helm("template", "enclave", str(CHART), *SECRETS, "--set", "replicaCount=2",
                     "--set", "persistence.data.accessModes={ReadWriteMany}", ok=False)
    assert no_db.returncode != 0 and "needs PostgreSQL" in no_db.stderr
    no_rwx = run_helm("template", "enclave", str(CHART), *SECRETS, "--set", "replicaCount=2",
                      "--set", "secrets.databaseUrl=postgresql+psycopg://x:y@db/enclave", ok=False)
    assert no_rwx.returncode != 0 and "ReadWriteMany" in no_rwx.stderr
    missing = run_helm("template", "enclave", str(CHART), ok=False)
    assert missing.returncode != 0 and "secrets.apiKeySecret is required" in missing.stderr
