"""Storage safety over a real server: database errors never put a question into the logs, files
are created private whatever the umask, and readiness tells the truth about the database and the
index files."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from app.api.app import create_app
from app.backup import create_backup
from app.container import Container
from app.settings import Settings
from tests.conftest import REPO, SAMPLES, MemoEmbedder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """The real app under uvicorn in a thread, on a free port."""

    def __init__(self, container: Container):
        self.container = container
        self.base = f"http://127.0.0.1:{_free_port()}"
        port = int(self.base.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(create_app(container), host="127.0.0.1", port=port,
                                                    log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not start")

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def _container(data_dir: Path, models_dir: Path, embedder, **settings) -> Container:
    container = Container(Settings(data_dir=data_dir, models_dir=models_dir, **settings))
    container.__dict__["embedder"] = MemoEmbedder(embedder)  # the real model, vectors memoised
    return container


# --- C. no user question in the logs on database errors -------------------------------------------

QUESTION = "How many days of annual leave does Wilhelmina Quarterfield-Osei get in 2027?"


def test_a_failed_database_write_logs_no_question(tmp_path: Path, models_dir: Path, embedder, caplog, capfd):
    container = _container(tmp_path / "var", models_dir, embedder)
    container.pipeline.run(SAMPLES / "leave-policy.md", "default")
    token, _ = container.api_keys.create("staff", "user")
    with container.engine.begin() as conn:  # the messages table refuses every row
        conn.execute(sa.text("CREATE TRIGGER refuse_messages BEFORE INSERT ON app_message "
                             "BEGIN SELECT RAISE(ABORT, 'message store unavailable'); END"))
    caplog.set_level(logging.DEBUG)
    with Served(container) as served, httpx.Client(base_url=served.base, timeout=300,
                                                   headers={"Authorization": f"Bearer {token}"}) as client:
        replies = [client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                             "max_tokens": 8, **extra})
                   for extra in ({}, {"conversation_id": None, "user": "u1"})]
    for reply in replies:
        assert reply.status_code == 500, reply.text
        assert reply.json()["error"]["code"] == "internal_error" and set(reply.json()["error"]) == {
            "message", "type", "param", "code"}
        assert "Quarterfield" not in reply.text
    logged = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    assert "message store unavailable" in logged  # the failure itself is logged, with its SQL
    # Once per request (it used to be logged again by uvicorn, which then dropped the connection).
    assert sum(r.getMessage().startswith("unhandled error on POST") for r in caplog.records) == len(replies)
    assert not any("Exception in ASGI application" in r.getMessage() for r in caplog.records)
    captured = capfd.readouterr()
    for where in (logged, captured.err, captured.out):
        assert "Quarterfield" not in where and "Wilhelmina" not in where


# --- B. private files whatever the umask ----------------------------------------------------------

def _loose(root: Path) -> list[str]:
    """Every folder not 0700 and file not 0600 under root, root included."""
    bad = []
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if mode != (0o700 if path.is_dir() else 0o600):
            bad.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return bad


@pytest.fixture
def permissive_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.slow
def test_everything_written_is_private_whatever_the_umask(tmp_path: Path, models_dir: Path, embedder,
                                                          permissive_umask):
    data = tmp_path / "site" / "var"  # two folders to create
    # The libraries on their own (an embedding application keeps its umask 022): ingest.
    container = _container(data, models_dir, embedder)
    container.pipeline.run(SAMPLES / "hr", "default")
    token, _ = container.api_keys.create("ops", "admin")
    assert (data / "enclave.db-wal").exists() and (data / "indexes" / "default" / ".lock").exists()
    assert _loose(data) == [] and (tmp_path / "site").stat().st_mode & 0o777 == 0o700

    create_backup(container.settings, tmp_path / "backups" / "BK")
    assert _loose(tmp_path / "backups" / "BK") == []
    assert (tmp_path / "backups").stat().st_mode & 0o777 == 0o700
    container.engine.dispose()

    # The server: a fresh data directory made by its container start, then an upload.
    os.umask(0o022)
    fresh = tmp_path / "served"
    server = _container(fresh, models_dir, embedder)
    with Served(server) as served, httpx.Client(base_url=served.base, timeout=300,
                                                headers={"Authorization": f"Bearer {server.api_keys.create('a', 'admin')[0]}"}) as admin:
        up = admin.post("/v1/knowledge_bases/default/documents",
                        files={"file": ("parking.md", b"# Parking\n\nVisitor passes are issued at the front desk.\n")})
        assert up.status_code == 201, up.text
    assert (fresh / "uploads" / "default" / "parking.md").is_file()
    assert _loose(fresh) == []

    # The console scripts as operators run them, from a shell with umask 022.
    os.umask(0o022)
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(data), "ENCLAVE_MODELS_DIR": str(models_dir), "PYTHONPATH": str(REPO)}
    for name in ("ENCLAVE_CONFIG", "ENCLAVE_DATABASE_URL"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", "app.cli.main", "audit", "export", "--out", str(tmp_path / "audit.jsonl")],
                   env=env, check=True, capture_output=True, timeout=600)
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    subprocess.run([sys.executable, "-m", "app.cli.ingest_cli", "run", str(SAMPLES / "leave-policy.md"), "--kb", "second"],
                   env=env, check=True, capture_output=True, timeout=600)
    assert _loose(data) == []


@pytest.mark.slow
def test_serve_warns_when_the_data_directory_is_readable_by_others(tmp_path: Path, models_dir: Path, embedder):
    data = tmp_path / "var"
    container = _container(data, models_dir, embedder)
    container.api_keys.create("ops", "admin")
    container.engine.dispose()
    os.chmod(data, 0o755)
    os.chmod(data / "enclave.db", 0o644)
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(data), "ENCLAVE_MODELS_DIR": str(models_dir), "PYTHONPATH": str(REPO)}
    for name in ("ENCLAVE_CONFIG", "ENCLAVE_DATABASE_URL"):
        env.pop(name, None)
    with socket.socket() as busy:  # the server warns, starts, cannot bind this port and exits
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "app.cli.main", "serve", "--port", str(busy.getsockname()[1])],
                              env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    text = proc.stderr.replace("\n", " ")
    assert f"warning: {data} has mode 0755" in text and f"{data / 'enclave.db'} has mode 0644" in text, text
    assert '"level": "WARNING", "logger": "enclave.serve"' in text  # the log has it too


# --- D. readiness that tells the truth ------------------------------------------------------------

def _search(client: httpx.Client, kb: str) -> httpx.Response:
    return client.post("/v1/search", json={"query": "annual leave days", "knowledge_base": kb, "top_k": 3})


@pytest.mark.slow
def test_a_damaged_index_makes_only_its_knowledge_base_unavailable(tmp_path: Path, models_dir: Path, embedder):
    data = tmp_path / "var"
    container = _container(data, models_dir, embedder)
    container.pipeline.run(SAMPLES / "leave-policy.md", "default")
    container.pipeline.run(SAMPLES / "leave-policy.md", "other")
    token, _ = container.api_keys.create("ops", "admin")
    manifest = json.loads((data / "indexes" / "other" / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {manifest["vectors"], manifest["lexical"]}
    with Served(container) as served, httpx.Client(base_url=served.base, timeout=300,
                                                   headers={"Authorization": f"Bearer {token}"}) as client:
        ready = httpx.get(f"{served.base}/readyz").json()
        assert ready["status"] == "ready" and ready["unavailable_knowledge_bases"] == {}, ready
        before = _search(client, "other").json()["results"]
        assert before

        # Overwrite a few bytes of the vectors (the id map lives in the same file).
        victim = data / "indexes" / "other" / manifest["vectors"]
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 8] = b"\x00" * 8
        victim.write_bytes(bytes(raw))
        ready = httpx.get(f"{served.base}/readyz")
        assert ready.status_code == 200  # the other knowledge bases keep the service ready
        assert set(ready.json()["unavailable_knowledge_bases"]) == {"other"}
        assert "sha256" in ready.json()["unavailable_knowledge_bases"]["other"]
        refused = _search(client, "other")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "knowledge_base_unavailable"
        assert "ingest run" in refused.json()["error"]["message"]
        assert _search(client, "default").json()["results"]

        # The next ingest into it rebuilds the index from the database.
        container.pipeline.run(SAMPLES / "leave-policy.md", "other")
        assert httpx.get(f"{served.base}/readyz").json()["unavailable_knowledge_bases"] == {}
        after = _search(client, "other").json()["results"]
        assert [(h["chunk_id"], round(h["score"], 5)) for h in after] == [(h["chunk_id"], round(h["score"], 5)) for h in before]


def test_readiness_fails_on_a_read_only_or_corrupted_database(tmp_path: Path, models_dir: Path, embedder):
    from app.db import make_engine
    from app.services.readiness import Readiness

    data = tmp_path / "var"
    container = _container(data, models_dir, embedder)
    container.pipeline.run(SAMPLES / "hr", "default")
    assert container.readiness.database() == "ok"
    # Read-only: the tests may run as root, where chmod does not stop writes, so the database is
    # opened through SQLite's read-only URI mode, which refuses writes as a read-only file does.
    url = f"sqlite:///file:{data / 'enclave.db'}?mode=ro&uri=true"
    read_only = Readiness(make_engine(url), container.kb_store)
    state = read_only.database()
    assert state.startswith("error") and "readonly" in state, state
    read_only.engine.dispose()
    container.engine.dispose()

    # One page of the file overwritten: the database answers SELECT 1 but fails its quick check.
    db = data / "enclave.db"
    raw = bytearray(db.read_bytes())
    page = 4096
    middle = len(raw) - page  # the last page: rows, not the schema that every statement reads
    raw[middle: middle + page] = bytes(range(256)) * (page // 256)
    db.write_bytes(bytes(raw))
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    state = Readiness(engine, container.kb_store).database()
    assert state.startswith("error"), state
    engine.dispose()
