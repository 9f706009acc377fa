"""Storage safety over a real server: database errors never put a question into the logs, files
are created private whatever the umask, and readiness tells the truth about the database and the
index files."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

from app.api.app import create_app
from app.container import Container
from app.settings import Settings
from tests.conftest import SAMPLES, MemoEmbedder


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
    captured = capfd.readouterr()
    for where in (logged, captured.err, captured.out):
        assert "Quarterfield" not in where and "Wilhelmina" not in where
