"""A real `enclave serve` process for browser tests: fresh data directory, samples/docs ingested,
an administrator key, the bundled models. Import the fixture into a test module:

    from tests.server_fixture import enclave_server  # noqa: F401
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES

READY_WITHIN_S = 600  # model load on a busy two-core machine; only a bound against hangs
STOP_WITHIN_S = 60


@dataclass(frozen=True)
class EnclaveServer:
    url: str
    admin_key: str
    data_dir: Path
    log_path: Path
    env: dict[str, str]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: Path, models_dir: Path) -> dict[str, str]:
    """The caller's environment without any Enclave configuration, pointed at a private data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
    env.update({
        "ENCLAVE_DATA_DIR": str(data_dir),
        "ENCLAVE_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _cli(env: dict[str, str], module: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"{module} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def enclave_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[EnclaveServer]:
    data_dir = tmp_path_factory.mktemp("web-server") / "var"
    env = server_env(data_dir, models_dir)
    report = json.loads(_cli(env, "app.cli.ingest_cli", "run", str(SAMPLES), "--json"))
    assert report["failed"] == 0 and report["added"] > 0, report
    admin_key = json.loads(_cli(env, "app.cli.main", "keys", "create", "web-admin", "--role", "admin", "--json"))["key"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = EnclaveServer(url, admin_key, data_dir, log_path, env)
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while not _ready(url):
            if proc.poll() is not None:
                pytest.fail(f"enclave serve exited with {proc.returncode} before it was ready:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"enclave serve was not ready within {READY_WITHIN_S} s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully (lifespan closes the engine)
            try:
                proc.wait(STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WITHIN_S)
