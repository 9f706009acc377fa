"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and the scrape config passes `promtool check config`.

promtool comes from Debian's `prometheus` package (scripts/ensure-promtool.sh, run by `make test`).
Missing promtool is a failure, not a skip: these checks are the only proof the rules work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

PROM = REPO / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make test` (scripts/ensure-promtool.sh installs Debian's prometheus package)")
    return path


def run(*args: str, cwd: Path) -> str:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_alert_rules_are_valid():
    out = run("check", "rules", "alerts.yml", cwd=PROM)
    assert "SUCCESS" in out


def test_alert_rules_unit_tests_pass():
    out = run("test", "rules", "alerts_test.yml", cwd=PROM)
    assert "SUCCESS" in out


def test_every_required_alert_has_a_unit_test():
    rules = (PROM / "alerts.yml").read_text()
    tests = (PROM / "alerts_test.yml").read_text()
    for alert in ("EnclaveGpuUtilisationHigh", "EnclaveGpuMemoryHigh", "EnclaveTimeToFirstTokenHigh",
                  "EnclaveErrorRatioHigh", "EnclaveAuditWriteFailures", "EnclaveIngestFailures",
                  "EnclaveGenerationQueueSaturated", "EnclaveGenerationRejected", "EnclaveDown"):
        assert f"alert: {alert}\n" in rules
        assert f"alertname: {alert}\n" in tests


def test_scrape_config_is_valid(tmp_path: Path):
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    (tmp_path / "enclave-metrics-token").write_text("token-for-the-check\n")  # promtool checks the file exists
    out = run("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "is valid prometheus config file" in out and "9 rules found" in out
