"""Uploads never cost a stored file: a bad file under a good one's name leaves the good one (and its
searchable document) intact, and what a server killed mid-upload left behind is settled at the next
start. A real `enclave serve` process, started twice on the same data directory."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.server_fixture import READY_WITHIN_S, STOP_WITHIN_S, _cli, _ready, free_port, server_env

pytestmark = pytest.mark.slow

GOOD = b"Visitor badges at the Rotterdam office are printed in teal and returned at the front desk.\n"
BAD = b"   \n\n  \n"  # no text at all: ingestion fails ("no text to index")
QUERY = {"query": "visitor badges Rotterdam teal front desk", "top_k": 3}


@contextmanager
def serve(env: dict[str, str], log_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_WITHIN_S  # a bound against hangs only
        while not _ready(url):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGKILL)  # killed, not stopped: nothing gets to tidy up
        proc.wait(STOP_WITHIN_S)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_failed_upload_keeps_the_stored_file_and_a_killed_one_is_settled_at_start(tmp_path: Path, models_dir: Path):
    data_dir = tmp_path / "var"
    env = server_env(data_dir, models_dir)
    key = json.loads(_cli(env, "app.cli.main", "keys", "create", "admin", "--role", "admin", "--json"))["key"]
    headers = {"Authorization": f"Bearer {key}"}
    folder = data_dir / "uploads" / "default"
    log_path = data_dir / "server.log"

    with serve(env, log_path) as url, httpx.Client(base_url=url, headers=headers, timeout=300) as api:
        good = api.post("/v1/knowledge_bases/default/documents", files={"file": ("dup.txt", GOOD)})
        assert good.status_code == 201, good.text
        bad = api.post("/v1/knowledge_bases/default/documents", files={"file": ("dup.txt", BAD)})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "unreadable_document", bad.text
        assert (folder / "dup.txt").read_bytes() == GOOD  # the stored original is untouched
        assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == ["dup.txt"]
        hits = api.post("/v1/search", json=QUERY).json()["results"]
        assert hits and hits[0]["source"] == "dup.txt" and "teal" in hits[0]["text"]
        docs = api.get("/v1/knowledge_bases/default/documents").json()["data"]
        assert [d["source"] for d in docs] == ["dup.txt"]

    # What a server killed during uploads leaves: (1) a temporary file never swapped in; (2) a new
    # file swapped in whose ingestion never committed (no document); (3) a replacement swapped in
    # over dup.txt, the original kept aside, its ingestion not committed.
    (folder / ".other.txt.0123456789abcdef.upload").write_bytes(b"half a file")
    (folder / "fresh.txt").write_bytes(b"A new file whose upload was cut off before its document was stored.\n")
    (folder / ".dup.txt.fedcba9876543210.previous").write_bytes(GOOD)
    (folder / "dup.txt").write_bytes(b"A replacement nobody ever ingested.\n")

    with serve(env, log_path) as url, httpx.Client(base_url=url, headers=headers, timeout=300) as api:
        assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == ["dup.txt"]
        assert (folder / "dup.txt").read_bytes() == GOOD
        docs = api.get("/v1/knowledge_bases/default/documents").json()["data"]
        assert [(d["source"], d["size"]) for d in docs] == [("dup.txt", len(GOOD))]
        assert api.post("/v1/search", json=QUERY).json()["results"][0]["source"] == "dup.txt"
        # An upload that did commit before the kill keeps the new file; the copy kept aside goes.
        newer = b"Visitor badges at the Rotterdam office are now printed in orange.\n"
        assert api.post("/v1/knowledge_bases/default/documents", files={"file": ("dup.txt", newer)}).status_code == 201
    (folder / ".dup.txt.0000000000000000.previous").write_bytes(GOOD)
    with serve(env, log_path) as url:
        assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == ["dup.txt"]
        assert (folder / "dup.txt").read_bytes() == newer
    log = log_path.read_text(errors="replace")
    assert "default/fresh.txt" in log and "default/other.txt" in log
