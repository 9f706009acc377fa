"""Backup and restore round trip on SQLite and PostgreSQL: ingest the samples, back up, wipe
everything, restore, and get the same search results, keys and files; a tampered backup is refused
before anything changes."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from app.backup import BackupError, create_backup, restore_backup
from app.container import Container
from app.settings import Settings
from security.principal import Principal
from tests.conftest import SAMPLES, MemoEmbedder

QUERIES = ["annual leave days", "security incident reporting", "报销流程", "compensation bands"]
READERS = [Principal("admin", "admin"), Principal("staff", "user", ("everyone",)),
           Principal("hr", "user", ("everyone", "hr"))]


def _container(data_dir: Path, database_url: str, models_dir: Path, embedder) -> Container:
    settings = Settings(data_dir=data_dir, database_url=database_url, models_dir=models_dir)
    container = Container(settings)
    container.__dict__["embedder"] = MemoEmbedder(embedder)  # the real model, vectors memoised
    return container


def _results(container: Container) -> list:
    return [[(h.chunk_id, h.source, round(h.fused_score, 6)) for h in container.retriever.search(q, "default", who, 5)]
            for q in QUERIES for who in READERS]


def _wipe(container: Container, data_dir: Path) -> None:
    with container.engine.begin() as conn:
        metadata = sa.MetaData()
        metadata.reflect(bind=conn)
        metadata.drop_all(conn)
    container.engine.dispose()
    shutil.rmtree(data_dir)


def test_round_trip_restores_everything(tmp_path: Path, database_url: str, models_dir: Path, embedder):
    data = tmp_path / "var"
    first = _container(data, database_url, models_dir, embedder)
    report = first.pipeline.run(SAMPLES, "default")
    assert report.failed == 0 and report.added > 5
    token, _ = first.api_keys.create("ops", "admin")
    (data / "adapters" / "v1").mkdir(parents=True)  # an adapter folder the fine-tuning layer would write
    (data / "adapters" / "v1" / "adapter_model.safetensors").write_bytes(b"\x00weights\x01" * 100)
    (data / "cache" / "onnx").mkdir(parents=True)  # a query graph the server exports from the model
    (data / "cache" / "onnx" / "all-minilm-l6-v2-0123.onnx").write_bytes(b"graph")
    before = _results(first)
    assert all(before[i] for i in range(len(before)) if i % 3 == 0)  # admins find something for every query
    stats = first.kb_store.stats("default")

    summary = create_backup(first.settings, tmp_path / "backup")
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert summary.database == ("sqlite" if database_url.startswith("sqlite") else "postgresql")
    assert manifest["database"]["tables"]["kb_chunk"] == stats.chunks
    names = set(manifest["files"])
    assert "data/secrets/api-key.secret" in names and "data/adapters/v1/adapter_model.safetensors" in names
    assert any(n.startswith("data/indexes/default/") for n in names)
    assert not any(n.startswith(("data/models", "data/cache")) or n.endswith(("enclave.db-wal", "enclave.db-shm"))
                   for n in names)

    _wipe(first, data)
    if database_url.startswith("sqlite"):
        # The restore target is a fresh installation at the same place.
        _container(data, database_url, models_dir, embedder).engine.dispose()

    restore_backup(Settings(data_dir=data, database_url=database_url, models_dir=models_dir), tmp_path / "backup")

    second = _container(data, database_url, models_dir, embedder)
    assert _results(second) == before
    assert second.kb_store.stats("default").chunks == stats.chunks
    assert second.api_keys.authenticate(token) is not None  # same rows, same keyed-hash secret
    assert (data / "adapters" / "v1" / "adapter_model.safetensors").read_bytes() == b"\x00weights\x01" * 100
    assert not list(data.glob(".restore-*"))
    # New rows get fresh ids after the restore (sequences moved past the restored ids).
    second.api_keys.create("after-restore", "user")
    later = second.pipeline.run(SAMPLES / "leave-policy.md", "second-kb")
    assert later.added == 1

    if importlib.util.find_spec("security.audit") is not None:  # the audit chain, once it exists
        from app.cli.main import app as cli

        result = CliRunner().invoke(cli, ["audit", "verify"], env={
            "ENCLAVE_DATA_DIR": str(data), "ENCLAVE_DATABASE_URL": database_url, "ENCLAVE_MODELS_DIR": str(models_dir)})
        assert result.exit_code == 0, result.output


def test_tampered_backup_is_refused_and_nothing_changes(tmp_path: Path, models_dir: Path, embedder):
    data = tmp_path / "var"
    url = f"sqlite:///{data / 'enclave.db'}"
    container = _container(data, url, models_dir, embedder)
    container.pipeline.run(SAMPLES / "hr", "default")
    create_backup(container.settings, tmp_path / "backup")
    with pytest.raises(BackupError, match="not empty"):
        create_backup(container.settings, tmp_path / "backup")

    # The live installation moves on after the backup.
    container.pipeline.run(SAMPLES / "leave-policy.md", "default")
    live_docs = len(container.kb_store.documents("default"))
    index_files = sorted(p.name for p in (data / "indexes" / "default").iterdir())

    backup = tmp_path / "backup"
    victim = next(p for p in sorted(backup.rglob("*.faiss")))
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(BackupError, match="does not match its sha256"):
        restore_backup(container.settings, backup)
    victim.write_bytes(original)

    (backup / "data" / "planted.txt").write_text("not from the backup")
    with pytest.raises(BackupError, match="not in its manifest"):
        restore_backup(container.settings, backup)
    (backup / "data" / "planted.txt").unlink()

    with pytest.raises(BackupError, match="manifest's sha256"):
        restore_backup(container.settings, backup, expect_manifest_sha256="0" * 64)

    # Nothing was replaced by the refused attempts.
    assert len(container.kb_store.documents("default")) == live_docs
    assert sorted(p.name for p in (data / "indexes" / "default").iterdir()) == index_files
    assert not list(data.glob(".restore-*"))

    # The CLI says why, in one line, with exit status 2.
    from app.cli.main import app as cli

    victim.write_bytes(b"tampered")
    result = CliRunner().invoke(cli, ["backup", "restore", str(backup), "--yes"],
                                env={"ENCLAVE_DATA_DIR": str(data), "ENCLAVE_MODELS_DIR": str(models_dir)})
    assert result.exit_code == 2 and "does not match its sha256" in result.output


@pytest.mark.slow
def test_cli_backup_and_restore_as_an_operator_types_them(tmp_path: Path, database_url: str, models_dir: Path):
    """`enclave keys create`, `backup create`, then `backup restore` into another data directory
    and back into the first one, each a real process, on SQLite (the default file inside the data
    directory) and on PostgreSQL. A fresh backup used to be refused because verifying its WAL-mode
    SQLite copy left -shm/-wal files next to it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    first, other, backup = tmp_path / "var", tmp_path / "other", tmp_path / "BK"
    sqlite = database_url.startswith("sqlite")

    def enclave(data_dir: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        env = {**os.environ, "ENCLAVE_DATA_DIR": str(data_dir), "ENCLAVE_MODELS_DIR": str(models_dir),
               "PYTHONPATH": str(REPO)}
        env.pop("ENCLAVE_CONFIG", None)
        env.pop("ENCLAVE_DATABASE_URL", None)
        if not sqlite:
            env["ENCLAVE_DATABASE_URL"] = database_url
        proc = subprocess.run([sys.executable, "-m", "app.cli.main", *args], cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        assert proc.returncode == expect, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def key_names(data_dir: Path) -> set[str]:
        return {k["name"] for k in json.loads(enclave(data_dir, "keys", "list", "--json").stdout)}

    token = json.loads(enclave(first, "keys", "create", "x", "--role", "admin", "--json").stdout)["key"]
    enclave(first, "backup", "create", "BK")
    assert sorted(p.relative_to(backup).as_posix() for p in (backup / "database").iterdir()) == (
        ["database/enclave.db"] if sqlite else sorted(f"database/{p.name}" for p in (backup / "database").glob("*.jsonl")))
    enclave(first, "keys", "create", "after-backup", "--role", "user")

    # Without a terminal and without --yes: a sentence saying what is missing, nothing changed.
    refused = enclave(other, "backup", "restore", "BK", expect=2)
    assert "confirmation" in refused.stderr and "--yes" in refused.stderr
    assert key_names(first) == {"x", "after-backup"}

    enclave(other, "backup", "restore", "BK", "--yes")
    listed = {p.relative_to(backup).as_posix() for p in backup.rglob("*") if p.is_file()}
    assert listed == set(json.loads((backup / "manifest.json").read_text())["files"]) | {"manifest.json"}
    assert key_names(other) == {"x"}
    settings = Settings(data_dir=other, database_url=database_url if not sqlite else f"sqlite:///{other / 'enclave.db'}",
                        models_dir=models_dir)
    container = Container(settings)
    assert container.api_keys.authenticate(token) is not None  # the keyed-hash secret came back too
    container.engine.dispose()
    enclave(other, "audit", "verify")

    # The same backup again, into the first installation: the key made after the backup is gone.
    enclave(first, "backup", "restore", "BK", "--yes")
    assert key_names(first) == {"x"}


def test_side_files_of_an_earlier_verification_are_ignored_but_a_wal_with_pages_is_not(tmp_path: Path, models_dir: Path):
    """Backups verified by an earlier version carry an -shm and an empty -wal beside their SQLite
    copy; they are never read (the copy is opened immutable). A -wal holding pages is refused."""
    data = tmp_path / "var"
    settings = Settings(data_dir=data, models_dir=models_dir)
    Container(settings).api_keys.create("ops", "admin")
    create_backup(settings, tmp_path / "backup")
    database = tmp_path / "backup" / "database"
    assert sorted(p.name for p in database.iterdir()) == ["enclave.db"]
    restore_backup(settings, tmp_path / "backup")
    assert sorted(p.name for p in database.iterdir()) == ["enclave.db"]  # verifying left nothing behind

    (database / "enclave.db-shm").write_bytes(b"\0" * 32768)
    (database / "enclave.db-wal").write_bytes(b"")
    restore_backup(settings, tmp_path / "backup")
    (database / "enclave.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)
    with pytest.raises(BackupError, match="enclave.db-shm is in the backup but not in its manifest"):
        restore_backup(settings, tmp_path / "backup")
