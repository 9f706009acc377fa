"""TLS on a real uvicorn server of the real application, configured exactly as `enclave serve`
configures it (app.serving.uvicorn_config): real handshakes on 127.0.0.1. TLS 1.3 only; under
mutual TLS a client without a certificate, or with one from another CA, is refused."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509

from app.api.app import create_app
from app.container import Container
from app.serving import uvicorn_config
from app.settings import Settings
from security.tls import TlsFiles, init, issue_client
from tests.conftest import REPO
from tests.server_fixture import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    files, created = init(tmp_path_factory.mktemp("tls") / "tls", ["enclave.test", "10.1.2.3"])
    assert created
    issue_client(files, "helpdesk-bot")
    return files


def start(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn_config(settings, create_app(Container(settings)), host="127.0.0.1", port=port,
                            lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture(scope="module")
def tls_server(pki: TlsFiles, tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("tls-var"),
                        server={"tls_certfile": pki.server_cert, "tls_keyfile": pki.server_key})
    server, thread, port = start(settings)
    yield port
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def mtls_server(pki: TlsFiles, tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("mtls-var"),
                        server={"tls_certfile": pki.server_cert, "tls_keyfile": pki.server_key,
                                "tls_client_ca": pki.ca_cert})
    server, thread, port = start(settings)
    yield port
    server.should_exit = True
    thread.join(30)


def client_context(pki: TlsFiles, version: ssl.TLSVersion | None = None, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(str(pki.client_cert(cert)), str(pki.client_key(cert)))
    return ctx


def exchange(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> tuple[str, bytes]:
    """A handshake and one HTTP request; returns the negotiated version and the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return tls.version(), data


def test_certificates_keys_and_sans(pki: TlsFiles):
    for key in (pki.ca_key, pki.server_key, pki.client_key("helpdesk-bot")):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "enclave.test"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    # A second init keeps the CA and re-issues the server certificate.
    _, created = init(pki.folder, ["enclave.test", "10.1.2.3"])
    assert not created and x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()) == ca


def test_tls13_is_served_and_tls12_is_refused(tls_server: int, pki: TlsFiles):
    version, response = exchange(tls_server, client_context(pki))
    assert version == "TLSv1.3" and response.startswith(b"HTTP/1.1 200") and b'"ok"' in response
    assert b"strict-transport-security" in response.lower()
    with pytest.raises(ssl.SSLError):
        exchange(tls_server, client_context(pki, ssl.TLSVersion.TLSv1_2))
    # The certificate names 127.0.0.1 too, and an ordinary HTTPS client trusts the private CA.
    with httpx.Client(verify=client_context(pki)) as c:
        assert c.get(f"https://127.0.0.1:{tls_server}/healthz").json() == {"status": "ok"}


def test_mutual_tls_requires_a_certificate_from_the_ca(mtls_server: int, pki: TlsFiles, tmp_path: Path):
    version, response = exchange(mtls_server, client_context(pki, cert="helpdesk-bot"))
    assert version == "TLSv1.3" and response.startswith(b"HTTP/1.1 200")
    # Without a certificate: TLS 1.3 lets the client finish its handshake; then the server aborts the
    # connection instead of answering (an SSL error on the first read, never an HTTP response).
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        exchange(mtls_server, client_context(pki))
    stranger, _ = init(tmp_path / "other-ca")
    issue_client(stranger, "intruder")
    foreign = ssl.create_default_context(cafile=str(pki.ca_cert))
    foreign.load_cert_chain(str(stranger.client_cert("intruder")), str(stranger.client_key("intruder")))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        exchange(mtls_server, foreign)
    with pytest.raises(ssl.SSLError):  # and TLS 1.2 stays refused, certificate or not
        exchange(mtls_server, client_context(pki, ssl.TLSVersion.TLSv1_2, cert="helpdesk-bot"))
    assert exchange(mtls_server, client_context(pki, cert="helpdesk-bot"))[1].startswith(b"HTTP/1.1 200")


def test_chunked_body_over_the_cap_is_refused_on_a_real_server(pki: TlsFiles, tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "var", server={"max_body_mb": 0.01})
    server, thread, port = start(settings)
    try:
        key = Container(settings).api_keys.create("u", "user")[0]
        body = json.dumps({"messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as c:
            chunked = c.post("/v1/chat/completions", content=(body[i:i + 4096] for i in range(0, len(body), 4096)),
                             headers={"Content-Type": "application/json"})
            assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
            assert "content-length" not in chunked.request.headers
            declared = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert declared.status_code == 413
    finally:
        server.should_exit = True
        thread.join(30)


def test_cli_tls_commands(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVE_")} | {"ENCLAVE_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli.main", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    done = cli("tls", "init", "--san", "rag.internal", "--key-type", "rsa")
    assert done.returncode == 0, done.stderr
    files = TlsFiles(tmp_path / "tls")
    assert "tls_certfile" in done.stdout and files.server_cert.is_file()
    assert x509.load_pem_x509_certificate(files.ca_cert.read_bytes()).public_key().key_size == 3072
    assert cli("tls", "client", "ops-laptop").returncode == 0 and files.client_cert("ops-laptop").is_file()
    bad = cli("tls", "client", "../escape")
    assert bad.returncode == 2 and "client name" in bad.stderr
