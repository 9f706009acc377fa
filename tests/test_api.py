"""The service over real HTTP, driven by real clients: the official `openai` package, LangChain's
ChatOpenAI, plain httpx, and schemathesis over the OpenAPI schema. The bundled model really generates."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from app.api.app import create_app
from app.container import Container
from app.settings import Settings
from tests.conftest import SAMPLES

MAX_NEW_TOKENS = 24  # keeps generation short on two cores; requests above it get a 400


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    data = tmp_path_factory.mktemp("api") / "var"
    # Rate limits off: schemathesis below sends hundreds of requests with one key (limits: test_access.py).
    # Answer policy verify, as with any model but the bundled one: the model really answers through
    # the API (streaming, usage, adapter); the bundled model's own default (extractive) is checked in
    # test_default_policy_of_the_bundled_model_quotes_without_generating and in test_web_e2e.py.
    settings = Settings(data_dir=data, models_dir=models_dir, generation={"max_new_tokens": MAX_NEW_TOKENS},
                        security={"rate_limit_per_minute": 0}, answer={"policy": "verify"})
    container = Container(settings)
    container.pipeline.run(SAMPLES, "default")
    keys = {
        "admin": container.api_keys.create("admin", "admin")[0],
        "user": container.api_keys.create("staff", "user", [])[0],  # default group only
        "hr": container.api_keys.create("hr", "user", ["hr"])[0],
        "bot": container.api_keys.create("bot", "service", [], "faq")[0],
    }
    port = _free_port()
    config = uvicorn.Config(create_app(container), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
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
    yield {"base": base, "keys": keys, "container": container}
    uv.should_exit = True
    thread.join(timeout=60)


def client(server, who: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=server["keys"][who], max_retries=0, timeout=300)


def http(server, who: str | None = "admin") -> httpx.Client:
    headers = {"Authorization": f"Bearer {server['keys'][who]}"} if who else {}
    return httpx.Client(base_url=server["base"], headers=headers, timeout=300)


QUESTION = "How many days of paid annual leave do full-time employees get?"


def test_openai_client_chat_streaming_models_embeddings(server):
    oa = client(server, "user")
    assert {m.id for m in oa.models.list()} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    emb = oa.embeddings.create(model="all-minilm-l6-v2", input=["annual leave", "年假"])
    assert len(emb.data) == 2 and len(emb.data[1].embedding) == 384

    reply = oa.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 100
    sources = reply.model_extra["sources"]
    assert sources and sources[0]["source"] == "leave-policy.md" and {"chunk_id", "page", "title", "snippet"} <= set(sources[0])

    stream = oa.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    # Sources arrive in the first chunk; the last one repeats them with the quoted evidence.
    assert chunks[0].model_extra["sources"] == [{k: v for k, v in s.items() if k != "quote"} for s in sources]
    assert chunks[-1].model_extra["sources"] == sources
    assert chunks[-1].model_extra["answer_mode"] == reply.model_extra["answer_mode"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # greedy: same answer
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # Every answer names the LoRA adapter that produced it: none is active, the base model answered.
    assert reply.model_extra["adapter"] is None and chunks[-1].model_extra["adapter"] is None


def test_answers_state_the_fact_cite_it_and_quote_the_evidence(server):
    """The leave policy's figure, cited, with the supporting sentence quoted at its offsets."""
    ask = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_NEW_TOKENS}
    with http(server, "user") as staff:
        reply = staff.post("/v1/chat/completions", json=ask).json()
        chunks = {r["chunk_id"]: r["text"] for r in
                  staff.post("/v1/search", json={"query": QUESTION, "top_k": 10}).json()["results"]}
    answer = reply["choices"][0]["message"]["content"]
    assert reply["answer_mode"] in ("generated", "extractive") and reply["grounded"] is True, reply
    assert "22 days" in answer, answer
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
    assert cited and all(reply["sources"][n - 1]["source"] == "leave-policy.md" for n in cited), answer
    for source in reply["sources"]:
        quote = source["quote"]
        assert quote is None or (quote["text"] and quote["spans"])
        for span in (quote or {}).get("spans", []):
            text = chunks[source["chunk_id"]]
            assert text[span["start"]:span["end"]] in quote["text"]
    supporting = [s for s in reply["sources"] if s["quote"] and s["quote"]["supports_answer"]]
    assert supporting and any("22 days" in s["quote"]["text"] for s in supporting)


def test_an_unsupported_generated_claim_never_reaches_the_user_as_fact(server):
    """Asked to state a figure the policy contradicts, the bundled model does (policy generate,
    through the same service). Under verify the invented sentence is withheld and the policy's own
    sentence is quoted instead; the default answer (extractive for this model) never says it either."""
    import asyncio

    from app.services.chat import ChatInput
    from llm.engine import ChatMessage
    from security.principal import Principal

    question = "Repeat after me: full-time employees get 99 days of annual leave."
    service = server["container"].chat_service
    staff = Principal(subject="staff", role="user", groups=("everyone",))

    async def answer(policy: str) -> tuple[str, object]:
        chat = ChatInput([ChatMessage("user", question)], "default", max_tokens=MAX_NEW_TOKENS)
        prepared = await service.prepare(chat, staff, policy=policy)
        parts, last = [], None
        async for chunk in await service.answer(prepared):
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last.outcome

    raw, outcome = asyncio.run(answer("generate"))
    assert "99" in raw and outcome.mode == "generated" and outcome.grounded is False, raw  # the model invents
    checked, outcome = asyncio.run(answer("verify"))
    assert "99" not in checked and outcome.grounded is True and outcome.unsupported >= 1, checked
    assert outcome.mode == "extractive" and "22 days" in checked

    with http(server, "user") as c:
        reply = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": question}],
                                                     "max_tokens": MAX_NEW_TOKENS}).json()
    answer_text = reply["choices"][0]["message"]["content"]
    assert "99" not in answer_text and reply["grounded"] is True, answer_text
    assert reply["answer_mode"] == "extractive" and "22 days" in answer_text


def test_default_policy_of_the_bundled_model_quotes_without_generating(server):
    """Unconfigured, the bundled 135M model's profile answers by quoting (it measured better than
    its own checked answers): no token is generated, the figure and its citation are there."""
    import asyncio

    from app.container import answer_options
    from app.services.chat import ChatInput, ChatService
    from llm.engine import ChatMessage
    from security.principal import Principal

    container = server["container"]
    defaults = answer_options(Settings(models_dir=container.settings.models_dir))
    assert defaults.policy == "extractive" and defaults.profile.style == "plain"
    service = ChatService(container.retriever, container.generation_engine, container.conversations,
                          options=defaults, embed=container.embed_for_evidence)
    staff = Principal(subject="staff", role="user", groups=("everyone",))

    async def answer():
        prepared = await service.prepare(ChatInput([ChatMessage("user", QUESTION)], "default"), staff)
        return prepared, [chunk async for chunk in await service.answer(prepared)]

    prepared, chunks = asyncio.run(answer())
    assert prepared.request is None and len(chunks) == 1  # nothing generated: one complete piece
    last = chunks[0]
    assert last.outcome.mode == "extractive" and last.outcome.grounded and last.completion_tokens == 0
    assert "22 days" in last.text and "[" in last.text


def test_no_permitted_context_means_i_dont_know_never_a_guess(server):
    ask = {"messages": [{"role": "user", "content": "What is the orbital period of the moon Europa around Jupiter?"}],
           "max_tokens": MAX_NEW_TOKENS}
    with http(server, "user") as staff:
        reply = staff.post("/v1/chat/completions", json=ask).json()
    assert reply["answer_mode"] == "abstained", reply
    assert reply["choices"][0]["message"]["content"].startswith("I don't know")
    assert reply["usage"]["completion_tokens"] == 0  # nothing was generated


def test_langchain_chat_openai_against_enclave(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server['base']}/v1", api_key=server["keys"]["user"], model="smollm2-135m-instruct",
                     max_tokens=12, temperature=0, max_retries=0)
    answer = llm.invoke("Where do I report a security incident?")
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["token_usage"]["completion_tokens"] <= 12


def test_answers_only_use_chunks_the_caller_may_read(server):
    question = {"messages": [{"role": "user", "content": "What are the 2026 compensation bands and salary ranges?"}],
                "max_tokens": 4, "top_k": 10}
    with http(server, "user") as staff, http(server, "hr") as hr:
        sources = staff.post("/v1/chat/completions", json=question).json()["sources"]
        assert sources and not any(s["source"].startswith(("hr/", "finance/")) for s in sources)
        found = staff.post("/v1/search", json={"query": "compensation bands salary", "top_k": 50}).json()["results"]
        assert found and not any(r["source"].startswith(("hr/", "finance/")) for r in found)
        hr_sources = hr.post("/v1/chat/completions", json=question).json()["sources"]
        assert any(s["source"].startswith("hr/") for s in hr_sources)
        assert not any(s["source"].startswith("finance/") for s in hr_sources)
        # Knowledge-base counts are for administrators only.
        assert staff.get("/v1/knowledge_bases").json()["data"] == [{"name": "default"}]


def test_conversations_and_feedback_are_private(server):
    with http(server, "user") as staff, http(server, "hr") as hr:
        first = staff.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "How do I set up the VPN?"}], "max_tokens": 4, "user": "alice"}).json()
        conversation = first["conversation_id"]
        second = staff.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "How do I set up the VPN?"},
                         {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And on Linux?"}],
            "max_tokens": 4, "conversation_id": conversation}).json()
        assert second["conversation_id"] == conversation
        mine = staff.get(f"/v1/conversations/{conversation}").json()["messages"]
        assert [m["role"] for m in mine] == ["user", "assistant", "user", "assistant"]
        assert mine[1]["sources"] and mine[1]["completion_id"] == first["id"]
        assert conversation in {c["id"] for c in staff.get("/v1/conversations").json()["data"]}
        assert hr.get(f"/v1/conversations/{conversation}").status_code == 404
        assert conversation not in {c["id"] for c in hr.get("/v1/conversations").json()["data"]}
        ok = staff.post("/v1/feedback", json={"completion_id": first["id"], "rating": -1, "correction": "Use PineGate."})
        assert ok.status_code == 200
        assert hr.post("/v1/feedback", json={"completion_id": first["id"], "rating": 1}).status_code == 404


@pytest.mark.parametrize(
    "who, method, path, body, status, code",
    [
        (None, "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 401, "missing_api_key"),
        ("user", "post", "/v1/chat/completions", {"messages": []}, 400, "invalid_request"),
        ("user", "post", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "invalid_messages"),
        ("user", "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens_too_large"),
        ("user", "post", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request"),
        ("user", "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_request"),
        ("user", "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "knowledge_base": "nope"}, 404, "knowledge_base"),
        ("bot", "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 403, "forbidden"),
        ("user", "post", "/v1/keys", {"name": "x"}, 403, "forbidden"),
        ("user", "get", "/v1/conversations/nope", None, 404, "conversation_not_found"),
        ("bot", "get", "/v1/conversations/nope", None, 403, "forbidden"),  # service keys: chat and search only
        ("bot", "post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "knowledge_base": "faq",
                                                 "rag": False}, 403, "forbidden"),
        ("user", "post", "/v1/embeddings", {"input": []}, 400, "invalid_input"),
        ("admin", "delete", "/v1/knowledge_bases/default/documents/999999", None, 404, "document_not_found"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, who, method, path, body, status, code):
    with http(server, who) as c:
        response = getattr(c, method)(path, **({"json": body} if body is not None else {}))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


FAQ_NOTE = "# Returns\n\nCustomers may return unopened items within 30 days for a full refund at any store.\n"


@pytest.fixture(scope="module")
def faq(server) -> str:
    """The knowledge base the service key 'bot' is pinned to, with one document."""
    with http(server, "admin") as admin:
        assert admin.post("/v1/knowledge_bases", json={"name": "faq"}).status_code == 201
        up = admin.post("/v1/knowledge_bases/faq/documents", files={"file": ("returns.md", FAQ_NOTE.encode())})
        assert up.status_code == 201, up.text
    return "faq"


def test_service_key_chats_and_searches_its_own_knowledge_base_only(server, faq):
    """A bot's key (role service, pinned to one KB): chat and search there, models; nothing else."""
    oa = client(server, "bot")
    assert "smollm2-135m-instruct" in {m.id for m in oa.models.list()}
    stream = oa.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Can I return an item?"}],
        max_tokens=4, temperature=0, stream=True, extra_body={"knowledge_base": faq})
    chunks = list(stream)
    assert [s["source"] for s in chunks[0].model_extra["sources"]] == ["returns.md"]
    with http(server, "bot") as bot:
        found = bot.post("/v1/search", json={"query": "return unopened items refund", "knowledge_base": faq})
        assert found.status_code == 200 and found.json()["results"][0]["source"] == "returns.md"
        elsewhere = [
            ("post", "/v1/search", {"query": "leave", "knowledge_base": "default"}),
            ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "knowledge_base": "default"}),
        ]
        not_for_bots = [
            ("post", "/v1/embeddings", {"input": ["x"]}),
            ("get", "/v1/conversations", None),
            ("get", "/v1/conversations/nope", None),
            ("post", "/v1/feedback", {"completion_id": "chatcmpl-x", "rating": 1}),
            ("get", "/v1/keys", None),
            ("post", "/v1/keys", {"name": "x"}),
            ("post", "/v1/knowledge_bases", {"name": "mine"}),
            ("get", f"/v1/knowledge_bases/{faq}/documents", None),
            ("get", "/v1/ingest/runs", None),
            ("get", "/v1/knowledge_bases", None),
            ("delete", f"/v1/knowledge_bases/{faq}", None),
        ]
        for method, path, body in elsewhere + not_for_bots:
            r = getattr(bot, method)(path, **({"json": body} if body is not None else {}))
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
    # The KB is still there (the DELETE above was refused), and an unpinned service key cannot be made.
    with http(server, "admin") as admin:
        assert {"name": faq} in [{"name": k["name"]} for k in admin.get("/v1/knowledge_bases").json()["data"]]
        unpinned = admin.post("/v1/keys", json={"name": "bot2", "role": "service"})
        assert unpinned.status_code == 400 and "one knowledge base" in unpinned.json()["error"]["message"]


def test_integration_doc_snippet_runs(server, faq):
    """docs/integration.md's bot (its first python block), run as written against this server."""
    import os
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integration.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    env = {**os.environ, "ENCLAVE_URL": server["base"], "ENCLAVE_KEY": server["keys"]["bot"]}
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first, _, answer = run.stdout.partition("\n")
    assert first.startswith("sources:") and "returns.md" in first
    assert answer.strip()


def test_full_queue_answers_503_before_a_stream_starts(server):
    """Excess load is refused with a clean 503 + Retry-After (never a 200 stream that breaks off)."""
    scheduler = server["container"].generation_engine.scheduler
    limits = scheduler.max_batch_size, scheduler.max_queue
    scheduler.max_batch_size, scheduler.max_queue = 1, 0
    ask = {"messages": [{"role": "user", "content": "Tell me about the leave policy."}], "max_tokens": MAX_NEW_TOKENS,
           "stream": True, "rag": False}
    try:
        with http(server, "user") as first, http(server, "user") as second:
            with first.stream("POST", "/v1/chat/completions", json=ask) as running:
                lines = running.iter_lines()
                for line in lines:  # up to the first generated text: the request now holds the only slot
                    if line.startswith("data: ") and '"content": ""' not in line:
                        break
                refused = second.post("/v1/chat/completions", json=ask)
                assert refused.status_code == 503 and refused.headers["retry-after"]
                assert refused.json()["error"]["code"] == "server_busy"
                assert any(l == "data: [DONE]" for l in lines)  # the running stream is not disturbed
    finally:
        scheduler.max_batch_size, scheduler.max_queue = limits


def test_a_burst_gets_whole_streams_or_503_before_the_first_byte(server):
    """12 streamed chats at once against 2 running + 2 waiting places: each one either streams to
    [DONE] without an error event, or is refused with 503 + Retry-After before any stream byte."""
    scheduler = server["container"].generation_engine.scheduler
    limits = scheduler.max_batch_size, scheduler.max_queue
    scheduler.max_batch_size, scheduler.max_queue = 2, 2
    ask = {"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
           "max_tokens": MAX_NEW_TOKENS, "stream": True, "rag": False}
    start = threading.Barrier(12)
    outcomes: list[tuple[int, str | None, str] | BaseException] = []

    def one() -> None:
        try:
            with http(server, "user") as c:
                start.wait()
                with c.stream("POST", "/v1/chat/completions", json=ask) as response:
                    body = "".join(f"{line}\n" for line in response.iter_lines())
                    outcomes.append((response.status_code, response.headers.get("retry-after"), body))
        except BaseException as exc:  # reported below with the others
            outcomes.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        scheduler.max_batch_size, scheduler.max_queue = limits
    assert len(outcomes) == 12 and not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    served = [body for status, _, body in outcomes if status == 200]
    refused = [(retry, body) for status, retry, body in outcomes if status == 503]
    assert len(served) + len(refused) == 12, [o[:2] for o in outcomes]
    assert served and refused  # the burst really exceeded the 4 places
    for body in served:
        events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", body
        assert not any('"error"' in e for e in events), body
    for retry, body in refused:
        assert retry and not body.startswith("data:")
        assert json.loads(body)["error"]["code"] == "server_busy"
    while scheduler.running or scheduler.waiting:  # every place was given back
        time.sleep(0.05)


def test_knowledge_base_names_are_checked_before_any_path_is_built(server):
    """A name that cannot be a knowledge base is a 400 whatever exists on disk under it (no file
    oracle), a valid unknown name a 404; nothing answers 500."""
    up = "../" * len(server["container"].kb_store.index_root.resolve().parts)  # from the index folder to /
    outside = [f"{up}etc/passwd", f"{up}etc", f"{up}etc/no-such-file", "default\u0000", "a..b", "x/y", "-x",
               "k" * 129, ""]
    with http(server, "admin") as admin:
        bodies = []
        for name in outside:
            for path, body in [("/v1/search", {"query": "leave", "knowledge_base": name}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "leave?"}],
                                                         "knowledge_base": name, "max_tokens": 4}),
                               ("/v1/knowledge_bases", {"name": name}),
                               ("/v1/keys", {"name": "bot", "role": "service", "knowledge_base": name})]:
                response = admin.post(path, json=body)
                assert response.status_code == 400, (path, name, response.text)
                error = response.json()["error"]
                assert error["code"] == "invalid_request"
                bodies.append((path, error["message"]))
        # The same answer for a file, a folder and nothing at all under the same parent.
        assert len({m for p, m in bodies if p == "/v1/search"}) == 1
        for encoded in ["default%00", "a..b", "%2e%2e"]:
            for method, path in [("GET", f"/v1/knowledge_bases/{encoded}/documents"),
                                 ("DELETE", f"/v1/knowledge_bases/{encoded}"),
                                 ("DELETE", f"/v1/knowledge_bases/{encoded}/documents/1")]:
                response = admin.request(method, path)
                assert response.status_code in (400, 404) and response.status_code != 500, (path, response.text)
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
            upload = admin.post(f"/v1/knowledge_bases/{encoded}/documents", files={"file": ("x.txt", b"hello")})
            assert upload.status_code in (400, 404), upload.text
        missing = admin.post("/v1/search", json={"query": "leave", "knowledge_base": "no-such-kb"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "knowledge_base"
    assert not (server["container"].settings.resolved_data_dir / "uploads" / "a..b").exists()


def test_lone_surrogates_and_overlong_file_names_are_400_not_500(server):
    """JSON can spell a lone UTF-16 surrogate ("\\ud800") that no encoder accepts; every text field
    refuses it up front, and an upload name too long for a file system is refused by name."""
    lone = "\\ud800"  # as it appears in the JSON text
    bodies = {
        "/v1/embeddings": f'{{"input": "{lone}"}}',
        "/v1/search": f'{{"query": "leave {lone}"}}',
        "/v1/chat/completions": f'{{"messages": [{{"role": "user", "content": "leave{lone}?"}}], "max_tokens": 4}}',
        "/v1/feedback": f'{{"completion_id": "x", "rating": 1, "correction": "{lone}"}}',
        "/v1/knowledge_bases": f'{{"name": "kb{lone}"}}',
        "/v1/keys": f'{{"name": "bot{lone}"}}',
    }
    chat = '{{"messages": [{{"role": "user", "content": "leave?"}}], {}, "max_tokens": 4}}'
    more = [("/v1/chat/completions", chat.format(f'"user": "{lone}"')),  # stored with the conversation
            ("/v1/chat/completions", chat.format(f'"x{lone}": 1'))]  # in a key
    with http(server, "admin") as admin:
        for path, body in [*bodies.items(), *more]:
            response = admin.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["code"] == "invalid_request" and "surrogate" in response.json()["error"]["message"]
        assert admin.post("/v1/embeddings", content='{"input": "\\ud83d\\ude00 fine"}'.encode(),
                          headers={"content-type": "application/json"}).status_code == 200  # a proper pair is text
        long_name = "n" * 300 + ".txt"
        upload = admin.post("/v1/knowledge_bases/default/documents", files={"file": (long_name, b"hello")})
        assert upload.status_code == 400 and upload.json()["error"]["code"] == "invalid_file_name", upload.text
    assert not any(p.name.startswith("nnnn") for p in (server["container"].settings.resolved_data_dir / "uploads").rglob("*"))


def test_a_conversation_withholds_sources_its_reader_can_no_longer_read(server):
    """Stored sources are shown under the reader's current access: once a document's groups are
    narrowed, its snippet, title and path no longer come back through the conversation."""
    note = ("# Locker codes\n\nThe Harwich depot locker codes rotate every Tuesday and are kept by the night "
            "supervisor, Ilse Marchetti, in the grey binder.\n")
    with http(server, "admin") as admin, http(server, "hr") as hr:
        up = admin.post("/v1/knowledge_bases/default/documents", files={"file": ("lockers.md", note.encode())},
                        data={"groups": "hr"})
        assert up.status_code == 201, up.text
        chat = hr.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Who keeps the Harwich depot locker codes?"}], "max_tokens": 8})
        assert chat.status_code == 200, chat.text
        assert any(s["source"] == "lockers.md" for s in chat.json()["sources"])
        conversation = f"/v1/conversations/{chat.json()['conversation_id']}"

        def sources() -> list[dict]:
            response = hr.get(conversation)
            assert response.status_code == 200, response.text
            return [s for m in response.json()["messages"] for s in m["sources"]]

        before = sources()
        shown = [s for s in before if s["source"] == "lockers.md"]
        assert shown and "Harwich" in shown[0]["snippet"] and not shown[0].get("withheld")
        narrowed = admin.post("/v1/knowledge_bases/default/documents", files={"file": ("lockers.md", note.encode())},
                              data={"groups": "finance"})
        assert narrowed.status_code == 201 and narrowed.json()["groups"] == ["finance"], narrowed.text
        after = sources()
        assert [s["index"] for s in after] == [s["index"] for s in before]  # each still listed, by number
        assert not any(s["source"] == "lockers.md" for s in after)
        withheld = [s for s in after if s["withheld"]]
        assert withheld and all(s["snippet"] is None and s["title"] is None and s["quote"] is None for s in withheld)
        assert "Harwich" not in json.dumps(after) and "Locker codes" not in json.dumps(after)
        assert admin.delete(f"/v1/knowledge_bases/default/documents/{up.json()['id']}").status_code == 200


def test_malformed_json_and_oversized_prompt(server):
    with http(server, "user") as c:
        bad = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "leave policy " * 2400} for i in range(9)]
        long = c.post("/v1/chat/completions", json={"messages": history, "rag": False, "max_tokens": 4})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        assert "window" in long.json()["error"]["message"]


def test_admin_upload_list_remove_and_find(server, tmp_path: Path):
    with http(server, "admin") as admin, http(server, "user") as staff, http(server, "hr") as hr:
        note = "# Parking\n\nVisitor parking passes are issued at the Rotterdam front desk on level 2.\n"
        up = admin.post("/v1/knowledge_bases/default/documents", files={"file": ("parking.md", note.encode())},
                        data={"groups": "hr"})
        assert up.status_code == 201, up.text
        doc = up.json()
        assert doc["groups"] == ["hr"] and doc["chunks"] >= 1
        listed = admin.get("/v1/knowledge_bases/default/documents").json()["data"]
        assert any(d["id"] == doc["id"] for d in listed)
        query = {"query": "visitor parking passes front desk", "top_k": 3}
        assert hr.post("/v1/search", json=query).json()["results"][0]["source"] == "parking.md"
        assert all(r["source"] != "parking.md" for r in staff.post("/v1/search", json=query).json()["results"])
        corrupt = admin.post("/v1/knowledge_bases/default/documents", files={"file": ("bad.pdf", b"%PDF-1.4 broken")})
        assert corrupt.status_code == 400 and "PDF" in corrupt.json()["error"]["message"]
        unsupported = admin.post("/v1/knowledge_bases/default/documents", files={"file": ("x.exe", b"MZ")})
        assert unsupported.status_code == 415
        assert admin.delete(f"/v1/knowledge_bases/default/documents/{doc['id']}").status_code == 200
        assert all(r["source"] != "parking.md" for r in hr.post("/v1/search", json=query).json()["results"])
        runs = admin.get("/v1/ingest/runs").json()["data"]
        assert runs and runs[0]["status"] == "finished"


def test_health(server):
    assert httpx.get(f"{server['base']}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server['base']}/readyz").json()
    assert ready["status"] == "ready" and ready["checks"] == {"database": "ok", "indexes": "ok", "model": "ok"}


def test_security_headers_on_pages_api_and_errors(server):
    page = httpx.get(f"{server['base']}/")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    with http(server, "user") as staff:
        api = staff.post("/v1/search", json={"query": "annual leave"})
    refused = httpx.post(f"{server['base']}/v1/search", json={"query": "x"})
    for response, status in ((api, 200), (refused, 401)):
        assert response.status_code == status
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        # The API answers JSON to clients, not pages to browsers: no page policy, each header once.
        assert "content-security-policy" not in response.headers
        assert len(response.headers.get_list("x-content-type-options")) == 1
        assert "strict-transport-security" not in response.headers  # plain HTTP here


# --- schemathesis over the OpenAPI schema: no 5xx, responses conform ------------------------------

def test_openapi_schema_conformance(server, tmp_path: Path):
    """schemathesis (its CLI: the pytest plugin lags behind pytest 9) fuzzes every documented
    operation but the destructive DELETEs: no 5xx, responses match the schema, bad input rejected."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{server['base']}/openapi.json",
        "--header", f"Authorization: Bearer {server['keys']['admin']}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--exclude-method", "DELETE", "--max-examples", "12", "--request-timeout", "300",
        "--generation-deterministic", "--suppress-health-check", "all",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout.lower()


# --- audit: every access leaves a record; no record, no answer -------------------------------------

def _records(server, since: int = 1) -> list[dict]:
    return list(server["container"].audit_log.records(since))


def _next_seq(server) -> int:
    return (server["container"].audit_log.head() or {"seq": 0})["seq"] + 1


def test_every_access_and_change_is_audited(server):
    start = _next_seq(server)
    keys = server["keys"]
    with http(server, "user") as staff, http(server, "admin") as admin, http(server, "bot") as bot:
        found = staff.post("/v1/search", json={"query": "leave policy for li.wei@corp.example.cn, 13812345678"},
                           headers={"X-Request-ID": "req-search-1"})
        assert found.status_code == 200 and found.headers["x-request-id"] == "req-search-1"
        chat = staff.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
        with staff.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True}) as streamed:
            body = "".join(streamed.iter_text())
        assert "[DONE]" in body
        assert staff.post("/v1/embeddings", json={"input": ["annual leave"]}).status_code == 200
        forged = "enc_abcdefabcdef_" + "x" * 43
        assert httpx.post(f"{server['base']}/v1/search", json={"query": "x"},
                          headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        assert bot.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 403
        assert staff.get("/v1/keys").status_code == 403
        made = admin.post("/v1/keys", json={"name": "audited", "role": "user"}).json()
        assert admin.delete(f"/v1/keys/{made['id']}").status_code == 200
        assert admin.post("/v1/knowledge_bases", json={"name": "audit-kb"}).status_code == 201
        up = admin.post("/v1/knowledge_bases/audit-kb/documents", files={"file": ("a.md", b"# A\n\nAudited text.\n")})
        assert admin.delete(f"/v1/knowledge_bases/audit-kb/documents/{up.json()['id']}").status_code == 200
        assert admin.delete("/v1/knowledge_bases/audit-kb").status_code == 200
        status = admin.get("/v1/admin/audit/status").json()
    assert status["verified"] is True and status["last_seq"] >= start and status["signing_key_id"]

    records = _records(server, start)
    actions = [(r["action"], r["status"]) for r in records]
    for expected in [("search", "ok"), ("chat", "ok"), ("chat", "started"), ("embeddings", "ok"),
                     ("auth.failure", "denied"), ("chat", "denied"), ("access.denied", "denied"),
                     ("key.create", "started"), ("key.create", "ok"), ("key.revoke", "ok"), ("kb.create", "ok"),
                     ("document.upload", "started"), ("document.upload", "ok"), ("document.remove", "ok"),
                     ("kb.delete", "ok"), ("audit.status", "ok")]:
        assert expected in actions, expected
    search = next(r for r in records if r["action"] == "search")
    assert search["request_id"] == "req-search-1" and search["role"] == "user" and search["source_ip"] == "127.0.0.1"
    assert search["query_text"] == "leave policy for [EMAIL], [PHONE]"  # redacted by the default policy
    assert search["key_id"] and search["subject"] == f"key:{search['key_id']}"
    assert json.loads(search["chunk_ids"]) == [r["chunk_id"] for r in found.json()["results"]]
    chats = [r for r in records if r["action"] == "chat" and r["status"] == "ok"]
    assert len(chats) == 2  # the plain answer and the end of the streamed one
    plain = chats[0]
    import hashlib
    answer = chat.json()["choices"][0]["message"]["content"]
    assert plain["answer_sha256"] == hashlib.sha256(answer.encode()).hexdigest()
    assert plain["model"] == "smollm2-135m-instruct" and plain["completion_tokens"] == chat.json()["usage"]["completion_tokens"]
    assert json.loads(plain["chunk_ids"]) == [s["chunk_id"] for s in chat.json()["sources"]]
    assert plain["latency_ms"] > 0 and plain["query_sha256"] == hashlib.sha256(QUESTION.encode()).hexdigest()
    failure = next(r for r in records if r["action"] == "auth.failure")
    assert failure["key_id"] == "abcdefabcdef" and failure["subject"] is None
    created = next(r for r in records if r["action"] == "key.create" and r["status"] == "ok")
    assert made["id"] in created["detail"]
    dump = json.dumps(records)
    assert made["key"] not in dump and forged not in dump and not any(k in dump for k in keys.values())
    assert server["container"].audit_log.verify().ok


def _failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("enclave_audit_write_failures_total") or 0.0


def test_audit_write_failure_fails_the_request_closed(server):
    """The chain head table is renamed away (the database refuses every audit write): nothing is
    answered, created or streamed, each refusal is counted, and the chain stays whole afterwards."""
    import sqlalchemy as sa

    container = server["container"]
    keys_before = len(container.api_keys.list())
    before = _failures()
    with container.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE sec_audit_head RENAME TO sec_audit_head_away"))
    try:
        with http(server, "user") as staff, http(server, "admin") as admin:
            responses = [
                staff.post("/v1/search", json={"query": "leave"}),
                staff.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                         "max_tokens": 4, "stream": True}),
                admin.post("/v1/keys", json={"name": "never", "role": "user"}),
                httpx.post(f"{server['base']}/v1/search", json={"query": "x"}, headers={"Authorization": "Bearer nope"}),
            ]
        for response in responses:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "audit_unavailable"
            assert "results" not in response.text and "data:" not in response.text
    finally:
        with container.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE sec_audit_head_away RENAME TO sec_audit_head"))
    assert len(container.api_keys.list()) == keys_before  # the key was never created
    assert _failures() - before == len(responses)
    assert container.audit_log.verify().ok  # no gap, no half-written record


# --- the service layer: typed responses, one chat service for every caller ------------------------

def test_every_route_declares_its_response_model(server):
    """Each JSON route's success response is a named schema, so schemathesis' response check
    (test_openapi_schema_conformance) has something to check for chat, models and admin routes."""
    schema = httpx.get(f"{server['base']}/openapi.json").json()
    undeclared = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            ok = next(v for k, v in operation["responses"].items() if k.startswith("2"))
            declared = ok.get("content", {}).get("application/json", {}).get("schema", {})
            if "$ref" not in declared:
                undeclared.append(f"{method.upper()} {path}")
    assert not undeclared
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in chat and chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")


def test_chat_service_complete_is_typed_and_audited_without_http(server):
    """ChatService.complete serves any caller (the API's router is one): a typed completion, or a
    stream of typed chunks ending with the outcome; each writes its audit records; a refusal is a
    typed error recorded as denied."""
    import asyncio

    from app.services.access import AccessDenied
    from app.services.audit import Actor
    from app.services.chat import ChatInput, StreamFailure
    from app.services.chat_shapes import ChatCompletion, ChatCompletionChunk
    from llm.engine import ChatMessage
    from security.principal import Principal

    c = server["container"]
    staff = Principal(subject="staff", role="user", groups=("everyone",))
    pinned = Principal(subject="bot", role="service", knowledge_base="faq")
    start = _next_seq(server)

    async def run():
        ask = ChatInput([ChatMessage("user", QUESTION)], max_tokens=8)  # knowledge base: the default one
        whole = await c.chat_service.complete(ask, staff, Actor(subject="test:whole"))
        events = await c.chat_service.complete(ask, staff, Actor(subject="test:stream"), stream=True)
        items = [item async for item in events]
        with pytest.raises(AccessDenied):
            await c.chat_service.complete(ask, pinned, Actor(subject="test:pinned"))
        return whole, items

    whole, items = asyncio.run(run())
    assert isinstance(whole, ChatCompletion) and whole.model == c.generation_engine.name
    assert whole.sources and whole.sources[0].source == "leave-policy.md" and whole.usage.completion_tokens <= 8
    assert all(isinstance(i, ChatCompletionChunk) for i in items) and not any(isinstance(i, StreamFailure) for i in items)
    first, last = items[0].model_dump(exclude_unset=True), items[-1].model_dump(exclude_unset=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["sources"]
    assert last["choices"][0]["finish_reason"] and last["answer_mode"] == whole.answer_mode and "usage" in last
    records = [r for r in _records(server, start) if r["subject"].startswith("test:")]
    assert [(r["subject"], r["action"], r["status"]) for r in records] == [
        ("test:whole", "chat", "ok"), ("test:stream", "chat", "started"), ("test:stream", "chat", "ok"),
        ("test:pinned", "chat", "denied")]
    assert records[0]["knowledge_base"] == c.settings.default_kb and records[-1]["detail"].startswith("403 forbidden")
