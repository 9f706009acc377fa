"""deploy/nginx/enclave.conf with Debian's real nginx (scripts/ensure-nginx.sh installs it) in front of a
real `enclave serve` process: `nginx -t`, then proxied TLS 1.3 requests and a streamed chat answer.

The deployable file is rendered for the test by replacing exactly its marked lines (ports, certificate
paths); each replacement must match once, so the test breaks if the file drifts from what it checks."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from security.tls import init
from tests.conftest import REPO
from tests.server_fixture import EnclaveServer, enclave_server, free_port  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
CONF = REPO / "deploy" / "nginx" / "enclave.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed: run `bash scripts/ensure-nginx.sh` (make test does)")
    return found


def render(folder: Path, listen_port: int, upstream_port: int) -> Path:
    files, _ = init(folder / "tls")
    text = CONF.read_text()
    for old, new in {
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{listen_port} ssl;",
        "listen [::]:443 ssl;": "",
        "/etc/enclave/tls/server.pem;": f"{files.server_cert};",
        "/etc/enclave/tls/server-key.pem;": f"{files.server_key};",
    }.items():
        assert text.count(old) == 1, f"{CONF.name} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    (folder / "enclave.conf").write_text(text)
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = folder / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} info;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n    access_log {folder / 'access.log'};\n{temp}\n    include {folder / 'enclave.conf'};\n}}\n")
    return main


@pytest.fixture(scope="module")
def proxy(enclave_server: EnclaveServer, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    binary = nginx_binary()
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    upstream = int(enclave_server.url.rsplit(":", 1)[1])
    main = render(folder, port, upstream)
    base = [binary, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(main)]
    checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "syntax is ok" in checked.stderr, checked.stderr
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.2)
        yield {"url": f"https://127.0.0.1:{port}", "ca": folder / "tls" / "ca.pem", "folder": folder,
               "key": enclave_server.admin_key}
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    assert "[emerg]" not in (folder / "error.log").read_text()


def _ctx(ca: Path, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_proxied_tls13_request_with_security_headers(proxy):
    with httpx.Client(base_url=proxy["url"], verify=_ctx(proxy["ca"]), timeout=120) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert health.extensions["network_stream"].get_extra_info("ssl_object").version() == "TLSv1.3"
        for header in ("strict-transport-security", "x-content-type-options", "x-frame-options"):
            assert header in health.headers, header
        assert health.headers["server"] == "nginx"  # server_tokens off: no version
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {proxy['key']}"})
        assert models.status_code == 200 and models.json()["data"]
        assert c.get("/v1/models").status_code == 401  # authentication still Enclave's
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy['url']}/healthz", verify=_ctx(proxy["ca"], ssl.TLSVersion.TLSv1_2))


def test_streamed_chat_answer_through_the_proxy(proxy):
    body = {"messages": [{"role": "user", "content": "How many days of annual leave do employees get?"}],
            "stream": True, "max_tokens": 12, "temperature": 0}
    headers = {"Authorization": f"Bearer {proxy['key']}"}
    events = []
    with httpx.Client(base_url=proxy["url"], verify=_ctx(proxy["ca"]), timeout=600) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["sources"] and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks).strip()
    assert chunks[-1]["usage"]["completion_tokens"] <= 12
    # nginx logs a request when the upstream response has ended, which can be just after the client
    # read [DONE]: wait for the line (the deadline only bounds a hang).
    access, deadline = proxy["folder"] / "access.log", time.monotonic() + 60
    while "POST /v1/chat/completions" not in access.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = access.read_text()
    assert "POST /v1/chat/completions HTTP/1.1\" 200" in log and proxy["key"] not in log
