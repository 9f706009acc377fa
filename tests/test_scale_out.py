"""Scale-out: two real `enclave serve` processes over one PostgreSQL database and one shared data
directory. A document uploaded through the first publishes a new index version; the second serves
it on its next search, without a restart.

Generation is not part of this test: both processes use the `openai` engine pointed at a closed
loopback port (start-up only warns that the server is unreachable), so each process loads just the
embedding model instead of a generation model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import REPO, SAMPLES, postgres_url
from tests.server_fixture import READY_WITHIN_S, STOP_WITHIN_S, _cli, _ready, free_port, server_env

NEEDLE = "quokka relocation protocol"
NEW_DOC = (b"# Quokka relocation protocol\n\nThe quokka relocation protocol requires form QX-7741, signed by two "
           b"facilities managers, before any office animal is moved between floors.\n")


@pytest.fixture
def shared_postgres() -> str:
    base = sa.engine.make_url(postgres_url())
    schema = f"scale_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _search(client: httpx.Client, url: str) -> list[str]:
    response = client.post(f"{url}/v1/search", json={"query": NEEDLE, "top_k": 3, "mode": "bm25"})
    assert response.status_code == 200, response.text
    return [r["source"] for r in response.json()["results"]]


@pytest.mark.slow
def test_an_ingest_through_one_replica_is_served_by_the_other(tmp_path: Path, models_dir: Path, shared_postgres: str):
    data_dir = tmp_path / "shared-data"
    env = server_env(data_dir, models_dir)
    env.update({
        "ENCLAVE_DATABASE_URL": shared_postgres,
        "ENCLAVE_SECURITY__API_KEY_SECRET": "shared-by-every-replica-" + uuid.uuid4().hex,
        "ENCLAVE_GENERATION__ENGINE": "openai",
        "ENCLAVE_GENERATION__OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # nothing listens there
        "ENCLAVE_GENERATION__OPENAI_MODEL": "none",
        "ENCLAVE_GENERATION__CONTEXT_WINDOW": "2048",
        "ENCLAVE_LOGGING__FORMAT": "json",
    })
    report = json.loads(_cli(env, "app.cli.ingest_cli", "run", str(SAMPLES / "it"), "--json"))
    assert report["added"] > 0 and report["failed"] == 0
    key = json.loads(_cli(env, "app.cli.main", "keys", "create", "scale-admin", "--role", "admin", "--json"))["key"]

    procs, urls, logs = [], [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            log = data_dir / f"server-{name}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "app.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        deadline = time.monotonic() + READY_WITHIN_S
        for proc, url, log in zip(procs, urls, logs):
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{url} did not become ready:\n{log.read_text(errors='replace')[-4000:]}")
                time.sleep(1)
        first, second = urls
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            assert "quokka-protocol.md" not in _search(client, second)
            before = client.get(f"{second}/v1/knowledge_bases").json()["data"][0]["index_version"]

            upload = client.post(f"{first}/v1/knowledge_bases/default/documents",
                                 files={"file": ("quokka-protocol.md", NEW_DOC)})
            assert upload.status_code == 201, upload.text

            deadline = time.monotonic() + 300  # only a bound against hangs: the next search reloads
            while "quokka-protocol.md" not in (found := _search(client, second)):
                if time.monotonic() > deadline:
                    pytest.fail(f"the second replica never served the new document; it returned {found}")
                time.sleep(0.5)
            assert found[0] == "quokka-protocol.md"
            after = client.get(f"{second}/v1/knowledge_bases").json()["data"][0]["index_version"]
            assert after > before
            assert procs[1].poll() is None  # the same process, never restarted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_WITHIN_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_WITHIN_S)
