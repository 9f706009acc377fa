"""OpenAIEngine against a real OpenAI-compatible server, plus scripted failures.

The real server is ``transformers serve`` running SmolLM2-135M-Instruct (see tests/servers/smollm2.py),
started once for the module. Failures that no real server produces on demand (429/5xx storms, a
connection cut mid-stream, an endpoint that never answers, a server echoing the API key back) come
from a small scripted HTTP server in this file and from plain sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from llm.engine import ChatMessage, Engine, EngineBusy, EngineError, GenerationRequest, PromptTooLong, collect
from llm.openai_engine import OpenAIEngine, _StopScanner
from tests.servers.smollm2 import TransformersServer, free_port, hf_checkpoint

API_KEY = "sk-enclave-test-7f3a9c0d1e2b"
QUESTION = [ChatMessage("user", "Name three colours of the rainbow.")]
STORY = [ChatMessage("user", "Write a long story about a dragon who learns to bake bread.")]


def run(coro):
    return asyncio.run(coro)


# --- the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(models_dir: Path, pytestconfig) -> Path:
    return hf_checkpoint(models_dir / "smollm2-135m-instruct", Path(pytestconfig.cache.mkdir("enclave-models")))


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory):
    served = TransformersServer(checkpoint, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture
def engine_for(server, tokenizer):
    def make(**overrides) -> OpenAIEngine:
        options = dict(
            base_url=server.base_url, model=server.model, api_key=API_KEY, context_window=8192, tokenizer=tokenizer
        )
        return OpenAIEngine(**{**options, **overrides})

    return make


async def start_and_close(engine: OpenAIEngine) -> OpenAIEngine:
    try:
        await engine.start()
    finally:
        await engine.close()
    return engine


async def generate_once(engine: OpenAIEngine, request: GenerationRequest):
    try:
        return await engine.generate(request)
    finally:
        await engine.close()


async def stream_and_generate(engine: OpenAIEngine, request: GenerationRequest):
    await engine.start()
    try:
        chunks = [chunk async for chunk in engine.stream(request)]
        result = await engine.generate(request)
    finally:
        await engine.close()
    return chunks, result


@pytest.mark.slow  # the real server (or its model)
def test_is_an_engine(engine_for):
    assert isinstance(engine_for(), Engine)
    assert API_KEY not in repr(engine_for())


@pytest.mark.slow  # the real server (or its model)
def test_streamed_chunks_concatenate_to_the_generated_text(engine_for, tokenizer):
    engine = engine_for()
    request = GenerationRequest(QUESTION, max_new_tokens=16, temperature=0.0, request_id="req-1")
    chunks, result = run(stream_and_generate(engine, request))

    assert len([c for c in chunks if c.text]) > 3  # really streamed, token by token
    assert "".join(c.text for c in chunks) == result.text and result.text.strip()
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    final = chunks[-1]
    assert final.finish_reason == result.finish_reason
    # Usage reported by the server, and equal to the local count of the chat-templated prompt.
    assert final.prompt_tokens == result.prompt_tokens == engine.count_prompt_tokens(QUESTION) > 10
    assert final.completion_tokens == result.completion_tokens > 0


@pytest.mark.slow  # the real server (or its model)
def test_max_tokens_honoured(engine_for):
    chunks, result = run(stream_and_generate(engine_for(), GenerationRequest(STORY, max_new_tokens=4)))
    assert chunks[-1].finish_reason == result.finish_reason == "length"
    assert chunks[-1].completion_tokens == result.completion_tokens == 4
    # The engine's own cap wins over a larger request.
    capped = run(stream_and_generate(engine_for(max_new_tokens=3), GenerationRequest(STORY, max_new_tokens=50)))[1]
    assert capped.finish_reason == "length" and capped.completion_tokens == 3


@pytest.mark.slow  # the real server (or its model)
def test_stop_sequences_honoured(engine_for):
    baseline = run(generate_once(engine_for(), GenerationRequest(QUESTION, max_new_tokens=16))).text
    words = baseline.split()
    assert len(words) >= 4, baseline
    stop = " " + words[len(words) // 2]
    expected = baseline[: baseline.index(stop)]

    request = GenerationRequest(QUESTION, max_new_tokens=16, stop=[stop, "zzz-never"])
    chunks, result = run(stream_and_generate(engine_for(), request))
    assert result.text == expected and result.finish_reason == "stop"
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)
    assert chunks[-1].completion_tokens == result.completion_tokens > 0


@pytest.mark.slow  # the real server (or its model)
def test_seeded_sampling_is_repeatable(engine_for):
    request = GenerationRequest(STORY, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=1234)
    chunks, result = run(stream_and_generate(engine_for(), request))  # sampled twice with one seed
    assert "".join(c.text for c in chunks) == result.text and result.completion_tokens == 8


@pytest.mark.slow  # the real server (or its model)
def test_closing_the_iterator_closes_the_http_stream(engine_for):
    responses = []

    async def remember(response):
        responses.append(response)

    async def scenario():
        engine = engine_for(http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [remember]}))
        await engine.start()
        try:
            # 1. The consumer stops reading and closes the iterator (a client that disconnects).
            stream = engine.stream(GenerationRequest(STORY, max_new_tokens=400))
            first = await anext(stream)
            assert first.text and not responses[-1].is_closed
            await stream.aclose()
            assert responses[-1].is_closed

            # 2. The consuming task is cancelled while waiting for the next token.
            got_one = asyncio.Event()

            async def consume():
                async for _ in engine.stream(GenerationRequest(STORY, max_new_tokens=400)):
                    got_one.set()

            task = asyncio.create_task(consume())
            await got_one.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert responses[-1].is_closed

            # The server took the hint: the next request is answered normally.
            result = await engine.generate(GenerationRequest(QUESTION, max_new_tokens=3))
            assert result.completion_tokens == 3
        finally:
            await engine.close()

    run(scenario())


@pytest.mark.slow  # the real server (or its model)
def test_start_checks_the_server(engine_for, caplog):
    # transformers serve does not report max_model_len (vLLM does): the window must then be configured.
    with pytest.raises(EngineError, match="context window"):
        run(start_and_close(engine_for(context_window=None)))
    with caplog.at_level(logging.WARNING, logger="llm.openai_engine"):
        engine = run(start_and_close(engine_for(model="no-such-model")))
    assert "does not list model 'no-such-model'" in caplog.text
    assert engine.context_window == 8192


@pytest.mark.slow  # the real server (or its model)
def test_wrong_model_is_a_clear_error(engine_for):
    with pytest.raises(EngineError) as caught:
        run(generate_once(engine_for(model="no-such-model"), GenerationRequest(QUESTION, max_new_tokens=2)))
    assert "HTTP 400" in str(caught.value) and "no-such-model" in str(caught.value)
    assert API_KEY not in str(caught.value)


# --- failures: dead, silent and misbehaving servers ------------------------------------------------


class Stub:
    """A scripted OpenAI-like HTTP server: each request gets the next scripted reply (the last repeats)."""

    def __init__(self, *script: Callable) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append({"path": self.path, "headers": headers, "body": body})
                reply = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                reply(self, body)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    stubs: list[Stub] = []

    def make(*script):
        stubs.append(Stub(*script))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def _send(handler, status: int, body: bytes, content_type: str, headers: dict | None = None, length: int | None = None):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()


def status(code: int, body: dict | None = None, headers: dict | None = None):
    def reply(handler, request):
        payload = body if body is not None else {"error": {"message": f"status {code}"}}
        _send(handler, code, json.dumps(payload).encode(), "application/json", headers)

    return reply


def echo_key(code: int):
    """A careless server that puts the Authorization header into its error message."""

    def reply(handler, request):
        message = f"invalid credentials: {handler.headers.get('Authorization')}"
        _send(handler, code, json.dumps({"error": {"message": message}}).encode(), "application/json")

    return reply


def _chunk(content=None, finish=None, usage=None, role=None):
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    event = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        event["usage"] = usage
    return event


def sse(pieces: list[str], usage: dict | None = None, cut: bool = False):
    """A streamed answer; ``cut`` drops the connection after the pieces (promising more body)."""

    def reply(handler, request):
        events = [_chunk(role="assistant"), *(_chunk(content=p) for p in pieces)]
        if not cut:
            events.append(_chunk(finish="stop", usage=usage))
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        body += "" if cut else "data: [DONE]\n\n"
        data = body.encode()
        _send(handler, 200, data, "text/event-stream", length=len(data) + 10_000 if cut else None)
        if cut:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)

    return reply


def completion(text: str, usage: dict | None = None):
    def reply(handler, request):
        body = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        if usage:
            body["usage"] = usage
        _send(handler, 200, json.dumps(body).encode(), "application/json")

    return reply


def stub_engine(base_url: str, **overrides) -> OpenAIEngine:
    options = dict(base_url=base_url, model="m", api_key=API_KEY, context_window=4096, max_retries=2, retry_backoff=0.01)
    return OpenAIEngine(**{**options, **overrides})


async def drain(engine: OpenAIEngine, request: GenerationRequest, into: list | None = None):
    try:
        async for chunk in engine.stream(request):
            if into is not None:
                into.append(chunk)
    finally:
        await engine.close()


def attempts_counter() -> tuple[list, openai.DefaultAsyncHttpxClient]:
    sent: list = []

    async def count(request):
        sent.append(request)

    return sent, openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]})


@pytest.mark.parametrize("mode", ["stream", "generate"])
def test_dead_server_fails_clearly_after_the_retries(mode, caplog):
    sent, client = attempts_counter()
    engine = stub_engine(f"http://127.0.0.1:{free_port()}/v1", http_client=client)  # nothing listens there
    request = GenerationRequest(QUESTION)
    with caplog.at_level(logging.DEBUG), pytest.raises(EngineError) as caught:
        run(drain(engine, request) if mode == "stream" else generate_once(engine, request))
    message = str(caught.value)
    assert type(caught.value) is EngineError
    assert message.startswith("cannot reach the model server at http://127.0.0.1:") and "after 3 attempts" in message
    assert len(sent) == 3  # the first try and max_retries=2
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert API_KEY not in message and API_KEY not in caplog.text


def test_credentials_in_the_url_are_not_shown():
    engine = stub_engine(f"http://admin:hunter2@127.0.0.1:{free_port()}/v1?token=abc", max_retries=0)
    with pytest.raises(EngineError) as caught:
        run(generate_once(engine, GenerationRequest(QUESTION)))
    assert "hunter2" not in str(caught.value) and "token=abc" not in str(caught.value)
    assert "hunter2" not in repr(engine)


@pytest.mark.parametrize("mode", ["stream", "generate"])
def test_silent_server_times_out_without_retrying(mode):
    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        sent, client = attempts_counter()
        engine = stub_engine(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout=0.5, http_client=client)
        request = GenerationRequest(QUESTION)
        with pytest.raises(EngineError, match=r"did not answer within 0.5 s"):
            run(drain(engine, request) if mode == "stream" else generate_once(engine, request))
        assert len(sent) == 1


@pytest.mark.parametrize("code", [429, 503])
def test_busy_server_gives_engine_busy_after_the_retries(stub, code):
    server = stub(status(code, headers={"Retry-After": "0"}))
    with pytest.raises(EngineBusy, match=f"busy \\(HTTP {code}\\) \\(after 3 attempts\\)"):
        run(drain(stub_engine(server.base_url), GenerationRequest(QUESTION)))
    assert len(server.requests) == 3


def test_5xx_and_cut_connections_before_the_first_token_are_retried(stub):
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    server = stub(status(502), sse([], cut=True), sse(["Hello", " world"], usage=usage))
    chunks: list = []
    run(drain(stub_engine(server.base_url), GenerationRequest(QUESTION), into=chunks))
    assert "".join(c.text for c in chunks) == "Hello world"
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (7, 2)
    assert len(server.requests) == 3
    sent = server.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert sent["body"]["stream"] is True and sent["body"]["stream_options"] == {"include_usage": True}


def test_never_retried_once_text_was_streamed(stub):
    server = stub(sse(["Hello", " wor"], cut=True), sse(["never sent"]))
    chunks: list = []
    with pytest.raises(EngineError, match="cut off") as caught:
        run(drain(stub_engine(server.base_url), GenerationRequest(QUESTION), into=chunks))
    assert "".join(c.text for c in chunks) == "Hello wor"
    assert len(server.requests) == 1
    assert not isinstance(caught.value, EngineBusy)


def test_api_key_never_appears_even_when_the_server_echoes_it(stub, caplog):
    server = stub(echo_key(401))
    with caplog.at_level(logging.DEBUG), pytest.raises(EngineError) as caught:
        run(drain(stub_engine(server.base_url), GenerationRequest(QUESTION)))
    message = str(caught.value)
    assert "refused the API key (HTTP 401)" in message and "Bearer ***" in message
    assert API_KEY not in message and API_KEY not in caplog.text
    assert len(server.requests) == 1  # not retried
    server500 = stub(echo_key(500))
    with caplog.at_level(logging.DEBUG), pytest.raises(EngineError) as caught:
        run(generate_once(stub_engine(server500.base_url), GenerationRequest(QUESTION)))
    assert API_KEY not in str(caught.value) and API_KEY not in caplog.text and len(server500.requests) == 3


def test_context_length_error_is_prompt_too_long(stub):
    vllm_message = (
        "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
        "(4500 in the messages, 500 in the completion). Please reduce the length of the messages or completion."
    )
    server = stub(status(400, {"object": "error", "message": vllm_message, "type": "BadRequestError", "code": 400}))
    with pytest.raises(PromptTooLong, match="maximum context length is 4096"):
        run(generate_once(stub_engine(server.base_url), GenerationRequest(QUESTION)))
    assert len(server.requests) == 1


@pytest.mark.slow  # the real server (or its model)
def test_usage_counted_locally_when_the_server_sends_none(stub, tokenizer):
    server = stub(sse(["The sky", " is blue."]), completion("The sky is blue."))
    engine = stub_engine(server.base_url, tokenizer=tokenizer)
    chunks: list = []
    run(drain(engine, GenerationRequest(QUESTION), into=chunks))
    expected = (engine.count_prompt_tokens(QUESTION), len(tokenizer.encode("The sky is blue.", add_special_tokens=False)))
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == expected
    result = run(generate_once(engine, GenerationRequest(QUESTION)))
    assert (result.prompt_tokens, result.completion_tokens) == expected
    # Without a tokenizer: the documented estimate, which over-counts English on purpose.
    long = [ChatMessage("system", "Answer from the context. " * 30), ChatMessage("user", "What is the policy? " * 30)]
    assert stub_engine(server.base_url).count_prompt_tokens(long) >= engine.count_prompt_tokens(long)


def test_stream_options_dropped_when_the_server_rejects_them(stub):
    server = stub(
        status(422, {"detail": "Unexpected fields in the request: {'stream_options'}"}),
        sse(["ok"]),
    )
    engine = stub_engine(server.base_url, max_retries=0)

    async def twice():
        first = await collect(engine.stream(GenerationRequest(QUESTION)))
        second = await collect(engine.stream(GenerationRequest(QUESTION)))
        await engine.close()
        return first, second

    first, second = run(twice())
    assert first.text == second.text == "ok"
    assert [("stream_options" in r["body"]) for r in server.requests] == [True, False, False]


def test_stop_enforced_when_the_server_ignores_it(stub):
    # The stop string arrives split across deltas and the server keeps generating past it.
    server = stub(
        sse(["Paris is the cap", "ital. ST", "OP and then", " more text"]),
        completion("Paris is the capital. STOP and more"),
    )
    request = GenerationRequest(QUESTION, stop=["STOP"])
    chunks: list = []
    run(drain(stub_engine(server.base_url), request, into=chunks))
    assert "".join(c.text for c in chunks) == "Paris is the capital. "
    assert all("ST" not in c.text for c in chunks) and chunks[-1].finish_reason == "stop"
    assert server.requests[0]["body"]["stop"] == ["STOP"]
    result = run(generate_once(stub_engine(server.base_url), request))
    assert result.text == "Paris is the capital. " and result.finish_reason == "stop"


def test_stop_scanner_holds_back_possible_prefixes():
    scanner = _StopScanner(["</answer>", "\n\n"])
    out = [scanner.feed(p) for p in ["Hello <", "/ans", "wer nope", "\n", "x", "\n", "\nrest"]]
    assert "".join(out) + scanner.flush() == "Hello </answer nope\nx"
    assert scanner.stopped
    passthrough = _StopScanner([])
    assert passthrough.feed("abc") == "abc" and passthrough.flush() == ""
