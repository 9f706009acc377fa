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
