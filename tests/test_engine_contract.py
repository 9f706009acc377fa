"""The engine contract of llm/engine.py, checked against both engines and through the API.

``open`` fails fast (busy, prompt too long, upstream unreachable or failing) before anything is
promised to a client; the API turns those failures into 503 + Retry-After / 400 / 502 before a
stream starts, never into a 200 whose stream carries an error. Both engines answer the same
protocol questions (adapters, queue) without the app probing them with hasattr.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.container import Container
from app.settings import Settings
from llm.engine import ChatMessage, Engine, EngineBusy, EngineError, GenerationRequest, HeldStream
from llm.openai_engine import OpenAIEngine
from llm.transformers_engine import TransformersEngine
from tests.test_openai_engine import sse, status, stub, stub_engine  # noqa: F401 (stub is a fixture)

QUESTION = [ChatMessage("user", "Name three colours of the rainbow.")]


def test_both_engines_speak_the_whole_protocol(models_dir: Path):
    local = TransformersEngine(models_dir / "smollm2-135m-instruct", name="smollm2-135m-instruct",
                               gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    remote = OpenAIEngine(base_url="http://127.0.0.1:9/v1", model="glm-4", context_window=4096)
    for engine in (local, remote):
        assert isinstance(engine, Engine)
        assert engine.adapter_version is None
    assert local.supports_adapters and not remote.supports_adapters
    assert local.queue_state() is None and remote.queue_state() is None  # local: not started yet
    with pytest.raises(EngineError, match="cannot switch adapters"):
        asyncio.run(remote.switch_adapter("v1", None))


def test_the_openai_engine_fails_fast_at_open(stub):
    async def open_only(engine: OpenAIEngine):
        try:
            return await engine.open(GenerationRequest(QUESTION))
        finally:
            await engine.close()

    busy = stub(status(503, headers={"Retry-After": "0"}))
    with pytest.raises(EngineBusy):
        asyncio.run(open_only(stub_engine(busy.base_url, max_retries=1)))
    failing = stub(status(500))
    with pytest.raises(EngineError) as caught:
        asyncio.run(open_only(stub_engine(failing.base_url, max_retries=1)))
    assert not isinstance(caught.value, EngineBusy) and len(failing.requests) == 2

    async def open_then_read(engine: OpenAIEngine) -> str:
        try:
            held = await engine.open(GenerationRequest(QUESTION))
            assert isinstance(held, HeldStream)
            return "".join([chunk.text async for chunk in held])
        finally:
            await engine.close()

    answering = stub(sse(["Red, ", "green, blue."]))
    assert asyncio.run(open_then_read(stub_engine(answering.base_url))) == "Red, green, blue."


@pytest.fixture
def remote_app(tmp_path: Path, models_dir: Path):
    def make(upstream) -> tuple[TestClient, dict]:
        settings = Settings(data_dir=tmp_path / "var", models_dir=models_dir, generation={
            "engine": "openai", "openai_base_url": upstream.base_url, "openai_model": "glm-4-9b-chat",
            "context_window": 4096, "max_retries": 0})
        container = Container(settings)
        key = {"Authorization": f"Bearer {container.api_keys.create('u', 'user')[0]}"}
        return TestClient(create_app(container), client=("127.0.0.1", 1)), key

    return make


CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "rag": False}


@pytest.mark.parametrize("stream", [False, True])
def test_a_busy_or_failing_model_server_is_503_or_502_before_any_stream(remote_app, stub, stream: bool):
    client, key = remote_app(stub(status(503, headers={"Retry-After": "0"})))
    with client:
        busy = client.post("/v1/chat/completions", headers=key, json={**CHAT, "stream": stream})
    assert busy.status_code == 503 and busy.headers["retry-after"], busy.text
    assert busy.headers["content-type"].startswith("application/json")
    assert busy.json()["error"]["code"] == "server_busy"

    client, key = remote_app(stub(status(500)))
    with client:
        failed = client.post("/v1/chat/completions", headers=key, json={**CHAT, "stream": stream})
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "engine_error", failed.text


def test_the_response_names_the_model_that_answered(remote_app, stub):
    client, key = remote_app(stub(sse(["Red, ", "green, blue."])))
    with client:
        answer = client.post("/v1/chat/completions", headers=key, json={**CHAT, "model": "gpt-4o"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "glm-4-9b-chat"  # not generation.model, not the client's wish
        assert answer.json()["choices"][0]["message"]["content"] == "Red, green, blue."
        streamed = client.post("/v1/chat/completions", headers=key, json={**CHAT, "stream": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert events and all(e["model"] == "glm-4-9b-chat" for e in events)
