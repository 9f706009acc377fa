"""Settings: YAML file, ENCLAVE_* overrides, derived folders, and the example config staying valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings, load_settings
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ENCLAVE_CONFIG", "ENCLAVE_DATA_DIR", "ENCLAVE_MODELS_DIR", "ENCLAVE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.resolved_data_dir == tmp_path / "var"
    assert settings.resolved_models_dir == tmp_path / "var" / "models"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'var' / 'enclave.db'}"
    assert settings.chunking.chunk_size == 750 and settings.ingest.default_groups == ["everyone"]


def test_example_config_is_valid_and_matches_defaults():
    from_file = load_settings(REPO / "enclave.example.yaml")
    assert from_file.model_dump() == Settings().model_dump()


def test_yaml_then_environment_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "enclave.yaml"
    config.write_text(
        "data_dir: /srv/enclave\nchunking:\n  chunk_size: 500\n  chunk_overlap: 50\n"
        "models:\n  glm:\n    path: /srv/models/glm-4-9b-chat-hf\n"
    )
    monkeypatch.setenv("ENCLAVE_MODELS_DIR", "/shared/models")
    monkeypatch.setenv("ENCLAVE_CHUNKING__CHUNK_OVERLAP", "60")
    settings = load_settings(config)
    assert settings.resolved_data_dir == Path("/srv/enclave")
    assert settings.resolved_models_dir == Path("/shared/models")
    assert (settings.chunking.chunk_size, settings.chunking.chunk_overlap) == (500, 60)
    assert settings.models["glm"].path == Path("/srv/models/glm-4-9b-chat-hf")

    monkeypatch.setenv("ENCLAVE_CONFIG", str(config))
    assert load_settings().chunking.chunk_size == 500


def test_bad_configuration_is_rejected(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(tmp_path / "missing.yaml")
    config = tmp_path / "bad.yaml"
    config.write_text("chunking:\n  chunk_size: 100\n  chunk_overlap: 100\n")
    with pytest.raises(ValidationError, match="chunk_overlap must be smaller"):
        load_settings(config)
    config.write_text("chunk_sise: 100\n")
    with pytest.raises(ValidationError, match="chunk_sise"):
        load_settings(config)


def test_a_config_file_never_leaks_into_the_environment_or_later_settings(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "enclave.yaml"
    config.write_text("default_kb: handbook\n")
    assert load_settings(config).default_kb == "handbook"
    assert "ENCLAVE_CONFIG" not in __import__("os").environ
    assert load_settings().default_kb == "default"  # the next construction does not inherit the file


def test_child_processes_get_the_config_file_as_an_argument(tmp_path: Path):
    import pickle

    from app.api.app import finetune_job_command

    config = tmp_path / "enclave.yaml"
    config.write_text("default_kb: handbook\n")
    settings = load_settings(config)
    command = finetune_job_command(settings)
    assert command[command.index("--config") + 1] == str(config.resolve())
    assert pickle.loads(pickle.dumps(settings)).config_path == config.resolve()  # as workers get it
    assert "--config" not in finetune_job_command(load_settings())


@pytest.mark.slow
def test_serve_workers_get_the_operators_settings_as_an_argument(tmp_path: Path, models_dir: Path):
    """`enclave --config F serve --workers 2`: each worker builds its container from F's settings
    (handed over pickled), not from an environment variable and not from the defaults."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tmp_path / "configured-data"
    config = tmp_path / "enclave.yaml"
    # The openai engine (pointed at nothing) keeps the workers from loading the generator.
    config.write_text(f"data_dir: {data_dir}\nmodels_dir: {models_dir}\nserver:\n  port: {port}\n"
                      "generation:\n  engine: openai\n  openai_base_url: http://127.0.0.1:9/v1\n  openai_model: absent\n  context_window: 2048\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli.main", "--config", str(config), "serve",
                             "--workers", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for _ in range(600):  # until both workers answer (or the process dies)
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert (data_dir / "enclave.db").is_file()  # the workers opened the configured database
        assert not (tmp_path / "var").exists()  # and never the default one
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
