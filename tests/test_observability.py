"""Operations over real HTTP: /metrics moves with real traffic (chat, search, upload), request ids,
JSON logs without secrets or questions, and the Grafana dashboard only charts series the app exposes."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from app.api.app import create_app
from app.container import Container
from app.logs import RedactingJsonFormatter, configure_logging, redact
from app.settings import Settings
from tests.conftest import REPO, SAMPLES

METRICS_TOKEN = "scrape-token-" + "x" * 24
# Must never reach a log line. A lower-case marker word: a name-like token ("zebracorn-7731") that no
# document mentions makes the chat answer "I don't know" without generating (answer.unknown_names).
SECRET_QUESTION = "zebracorn how many days of annual leave"
MAX_NEW_TOKENS = 8


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    log_buffer = io.StringIO()
    previous_level = logging.getLogger().level
    configure_logging("json", "DEBUG", stream=log_buffer)
    data = tmp_path_factory.mktemp("ops") / "var"
    settings = Settings(data_dir=data, models_dir=models_dir, generation={"max_new_tokens": MAX_NEW_TOKENS, "max_queue": 7},
                        metrics={"bearer_token": METRICS_TOKEN}, answer={"policy": "verify"})  # the model answers
    container = Container(settings)
    container.pipeline.run(SAMPLES, "default")
    keys = {
        "admin": container.api_keys.create("admin", "admin")[0],
        "user": container.api_keys.create("staff", "user", [])[0],  # default group only: hr/ and finance/ hidden
        "service": container.api_keys.create("bot", "service", [], "default")[0],  # service keys are pinned to a KB
    }
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(container), host="127.0.0.1", port=port, log_config=None,
                                       access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the API server did not become ready")
    yield {"base": base, "keys": keys, "logs": log_buffer}
    uv.should_exit = True
    thread.join(timeout=60)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "enclave"]:
        root.removeHandler(handler)
    root.setLevel(previous_level)
    logging.getLogger("uvicorn.access").disabled = False


def http(server, who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server['keys'][who]}"} if who else {}
    return httpx.Client(base_url=server["base"], headers=headers, timeout=300)


def scrape(server) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(f"{server['base']}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def traffic(server):
    """One chat, one search and one upload between two scrapes."""
    before = scrape(server)
    with http(server, "user") as staff, http(server, "admin") as admin:
        chat = staff.post("/v1/chat/completions", headers={"X-Request-ID": "ops-test-chat-1"},
                          json={"messages": [{"role": "user", "content": SECRET_QUESTION}], "max_tokens": MAX_NEW_TOKENS})
        assert chat.status_code == 200, chat.text
        found = staff.post("/v1/search", json={"query": SECRET_QUESTION, "top_k": 3})
        assert found.status_code == 200 and found.json()["results"]
        upload = admin.post("/v1/knowledge_bases/default/documents",
                            files={"file": ("ops-note.md", b"# Ops note\n\nThe on-call rota changes every Monday.\n")})
        assert upload.status_code == 201, upload.text
    return {"before": before, "after": scrape(server), "chat": chat.json(), "chat_response": chat}


def test_metrics_need_the_token_or_an_admin_key(server):
    url = f"{server['base']}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for who in ("user", "service"):
        response = httpx.get(url, headers={"Authorization": f"Bearer {server['keys'][who]}"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert httpx.get(url, headers={"Authorization": f"Bearer {server['keys']['admin']}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200


def test_series_move_with_chat_search_and_upload(traffic):
    before, after, usage = traffic["before"], traffic["after"], traffic["chat"]["usage"]
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731

    chat_route = dict(method="POST", route="/v1/chat/completions", status="200")
    assert delta("enclave_http_request_duration_seconds_count", **chat_route) == 1
    assert delta("enclave_http_request_duration_seconds_sum", **chat_route) > 0
    assert delta("enclave_http_request_duration_seconds_count", route="/v1/search", status="200") == 1
    upload_route = "/v1/knowledge_bases/{name}/documents"  # the template, not the raw path
    assert delta("enclave_http_request_duration_seconds_count", route=upload_route, status="201") == 1

    model = "smollm2-135m-instruct"
    assert delta("enclave_generation_time_to_first_token_seconds_count", model=model) == 1
    assert 0 < delta("enclave_generation_time_to_first_token_seconds_sum", model=model) < 600
    assert delta("enclave_generation_prompt_tokens_total", model=model) == usage["prompt_tokens"]
    # Every prompt token was either computed by the prefill or taken from a cached prefix.
    prefilled = [delta("enclave_generation_prefill_tokens_total", source=s) for s in ("computed", "cached")]
    assert prefilled[0] > 0 and sum(prefilled) == usage["prompt_tokens"]
    assert delta("enclave_generation_generated_tokens_total", model=model) == usage["completion_tokens"]
    # The generation ended once, by EOS or the token limit, or stopped by the verify check (the
    # response's own finish_reason is "stop" when an extractive answer replaced the model's).
    assert sum(delta("enclave_generation_requests_total", model=model, outcome=o) for o in ("stop", "length")) == 1
    chat = traffic["chat"]
    assert delta("enclave_answers_total", mode=chat["answer_mode"], grounded=str(chat["grounded"]).lower()) == 1
    if usage["completion_tokens"] > 1:
        assert delta("enclave_generation_inter_token_latency_seconds_count", model=model) == 1
        # The first token comes from the prefill; every later one from one batched decode step.
        assert delta("enclave_generation_batch_size_count") >= usage["completion_tokens"] - 1
        assert delta("enclave_generation_batch_size_sum") >= usage["completion_tokens"] - 1

    # Two searches (the chat's retrieval and /v1/search), both by a reader who may not see hr/ and finance/.
    assert delta("enclave_retrieval_duration_seconds_count", mode="hybrid") == 2
    assert delta("enclave_retrieval_acl_filtered_chunks_count") == 2
    assert delta("enclave_retrieval_acl_filtered_chunks_sum") >= 2

    assert delta("enclave_ingest_files_total", outcome="added") == 1
    assert delta("enclave_ingest_runs_total", status="finished") == 1
    # The failure series is exposed (at its current count) before this run fails anything; other tests
    # in this process may already have counted failures, so only its presence and delta are checked.
    assert any(n == "enclave_ingest_files_total" and ("outcome", "failed") in ls for n, ls in after)
    assert delta("enclave_ingest_files_total", outcome="failed") == 0

    assert value(after, "enclave_generation_requests_running", model=model) == 0
    assert value(after, "enclave_generation_requests_waiting", model=model) == 0
    assert value(after, "enclave_generation_max_waiting", model=model) == 7
    assert value(after, "enclave_generation_max_running", model=model) == 16
    assert value(after, "enclave_adapter_info", model=model, version="none") == 1


def test_gpu_series_absent_without_a_gpu(traffic):
    try:
        import pynvml

        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        has_gpu = False
    gpu = [name for name, _ in traffic["after"] if name.startswith("enclave_gpu_")]
    if has_gpu:
        assert {"enclave_gpu_utilization_ratio", "enclave_gpu_memory_used_bytes",
                "enclave_gpu_temperature_celsius"} <= set(gpu)
    else:
        assert gpu == []  # absent, not zeros


def test_request_ids_in_and_out(server, traffic):
    assert traffic["chat_response"].headers["x-request-id"] == "ops-test-chat-1"
    generated = httpx.get(f"{server['base']}/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = httpx.get(f"{server['base']}/healthz", headers={"X-Request-ID": "a b;<" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])  # replaced, not echoed


def test_logs_are_json_with_request_ids_and_no_secrets(server, traffic):
    text = server["logs"].getvalue()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records, "no log lines"
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    chat = [r for r in records if r.get("request_id") == "ops-test-chat-1"]
    assert any(r["logger"] == "enclave.access" and r["route"] == "/v1/chat/completions" and r["status"] == 200
               for r in chat), chat
    for secret in (*server["keys"].values(), METRICS_TOKEN):
        assert secret not in text
    assert "zebracorn" not in text  # neither the question nor the search query


def test_redaction_of_secret_shapes():
    key = "enc_abcdefghij12_" + "A" * 43
    line = redact(f"key {key} header Authorization: Bearer tok.en-123 url postgresql+psycopg://enclave:hunter2@db:5432/x "
                  "api_key=sk-live-1")
    for secret in (key, "tok.en-123", "hunter2", "sk-live-1"):
        assert secret not in line
    assert "postgresql+psycopg://enclave:[REDACTED]@db:5432/x" in line


def test_redaction_scrubs_values_not_the_words_around_them():
    plain = ["bearer token refused from 10.0.0.1: Signature has expired", "invalid token: Signature has expired",
             "invalid API key (bearer tokens other than API keys are not enabled)", "the token was revoked",
             "password reset requested", "Bearer authentication failed"]
    for line in plain:
        assert redact(line) == line
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    secrets_in = {f"Bearer {jwt_like}": jwt_like, "token=abc": "abc", "access_token: 9f8e7d6c5b4a3f2e": "9f8e7d6c5b4a3f2e",
                  "{'token': 'short', 'password': 'pw'}": "short", "password: hunter2": "hunter2",
                  "authorization=Basic dXNlcjpwYXNz": "dXNlcjpwYXNz", "Authorization: Bearer x": "Bearer x"}
    for line, secret in secrets_in.items():
        assert secret not in redact(line) and "[REDACTED]" in redact(line), line
    # Through the JSON formatter (quotes escaped in the output): the same.
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(RedactingJsonFormatter(["message"]))
    logger = logging.getLogger("enclave.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("bearer token refused; body %s", json.dumps({"token": "short1"}))
    finally:
        logger.removeHandler(handler)
    line = json.loads(buffer.getvalue().splitlines()[-1])["message"]
    assert line.startswith("bearer token refused; body ") and "short1" not in line and "[REDACTED]" in line


def test_dashboard_only_charts_series_the_app_exposes(traffic):
    from app.metrics import GpuCollector

    exposed = {name for name, _ in traffic["after"]}
    # Absent on a host without a GPU, by design; their names come from the collector itself.
    exposed |= {f"{name}" for name in GpuCollector.NAMES}
    # Metrics of modules merged separately (the audit chain's counter): required once some source
    # file defines them, allowed to be absent before.
    defined_elsewhere = {"enclave_audit_write_failures_total": "enclave_audit_write_failures"}
    sources = "\n".join(p.read_text(errors="replace") for d in ("app", "security", "llm", "retrieval", "ingest", "finetune")
                        for p in (REPO / d).rglob("*.py"))
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/enclave.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 12
    referenced = set()
    for expr in exprs:
        referenced |= {m for m in re.findall(r"\b(enclave_[a-z0-9_]+)", expr)}
    assert referenced
    missing = []
    for name in sorted(referenced):
        if name in exposed:
            continue
        if name in defined_elsewhere and defined_elsewhere[name] not in sources:
            continue
        missing.append(name)
    assert not missing, f"dashboard expressions reference series the app does not expose: {missing}"
    # Every metric family the service defines is charted somewhere.
    families = {re.sub(r"_(bucket|sum|count|total|info)$", "", n) for n in exposed if n.startswith("enclave_")}
    charted = {re.sub(r"_(bucket|sum|count|total|info)$", "", n) for n in referenced}
    assert families - charted == set()
