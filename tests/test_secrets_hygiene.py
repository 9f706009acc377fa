"""No secret ever reaches a log record, a response body or an audit record: Enclave API keys (valid
and invalid), the remote engine's API key (even when the remote server echoes it back), the API-key
hashing secret."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.api.app import create_app
from app.container import Container
from app.settings import Settings

UPSTREAM_KEY = "sk-upstream-" + "S3cr3t" * 6
HASH_SECRET = "hash-secret-" + "H" * 40


class EchoingUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that refuses the key and quotes it in its error (some do)."""

    def _refuse(self) -> None:
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}",
                                     "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_no_secret_in_logs_responses_or_audit(upstream: str, models_dir: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.DEBUG)  # everything any logger emits, server side and libraries
    settings = Settings(
        data_dir=tmp_path / "var", models_dir=models_dir,
        generation={"engine": "openai", "openai_base_url": upstream, "openai_model": "remote-model",
                    "openai_api_key": UPSTREAM_KEY, "context_window": 2048, "max_retries": 0},
        security={"api_key_secret": HASH_SECRET},
    )
    container = Container(settings)
    admin_key = container.api_keys.create("admin", "admin")[0]
    user_key = container.api_keys.create("staff", "user")[0]
    wrong_key = user_key[:-4] + ("AAAA" if not user_key.endswith("AAAA") else "BBBB")  # right shape, wrong secret
    secrets = [UPSTREAM_KEY, HASH_SECRET, admin_key, user_key, wrong_key]
    bodies: list[str] = []
    with TestClient(create_app(container), client=("127.0.0.1", 50000)) as client:
        def call(method: str, path: str, key: str | None, **kwargs) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = client.request(method, path, headers=headers, **kwargs)
            bodies.append(response.text + json.dumps(dict(response.headers)))
            return response.status_code

        chat = {"messages": [{"role": "user", "content": "hello"}], "rag": False, "max_tokens": 4}
        assert call("POST", "/v1/chat/completions", user_key, json=chat) == 502  # upstream refused its key
        # Streamed too: the refusal is known before the stream starts (engine contract), so a 502,
        # never a 200 whose stream carries the error.
        assert call("POST", "/v1/chat/completions", user_key, json={**chat, "stream": True}) == 502
        assert call("POST", "/v1/chat/completions", wrong_key, json=chat) == 401
        assert call("POST", "/v1/search", f"{user_key} trailing", json={"query": "x"}) == 401
        assert call("GET", "/v1/keys", user_key) == 403
        assert call("POST", "/v1/keys", admin_key, json={"name": "x", "role": "user"}) == 201
        assert call("GET", "/v1/models", admin_key) == 200
    assert any("refused the API key" in b for b in bodies)  # the upstream's error did reach the client...

    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("ENCLAVE_GENERATION__OPENAI_API_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("ENCLAVE_SECURITY__API_KEY_SECRET", HASH_SECRET)
    monkeypatch.delenv("ENCLAVE_CONFIG", raising=False)
    from app.cli.main import app as cli

    shown = CliRunner().invoke(cli, ["config", "show"])
    assert shown.exit_code == 0 and "openai_api_key" in shown.output
    bodies.append(shown.output)

    logged = []
    for record in caplog.records:
        logged.append(record.getMessage())
        if record.exc_info:
            logged.append(logging.Formatter().formatException(record.exc_info))
    audit = json.dumps(list(container.audit_log.records()))
    assert logged and audit
    for secret in secrets:
        for where, text in (("log", "\n".join(logged)), ("response", "\n".join(bodies)), ("audit", audit)):
            assert secret not in text, f"a secret appears in a {where}"
    # ...but with the key cut out, even in the part of the upstream's message that quoted it.
    assert "Incorrect API key provided: Bearer ***" in "\n".join(bodies)
