"""Adapter hot swap in a running TransformersEngine: in-flight requests keep their adapter, new ones switch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from finetune.hotswap import AdapterWatcher
from finetune.registry import Registry
from llm.engine import ChatMessage, GenerationRequest
from llm.loading import load
from llm.transformers_engine import TransformersEngine
from tests.finetune_fixtures import make_tiny_llama, one_thread, random_adapter  # noqa: F401 (autouse)

LONG = 120  # tokens of the request in flight during the swap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    model_dir = make_tiny_llama(root / "model", init_std=0.5)
    adapters = {v: random_adapter(model_dir, root / v, seed) for v, seed in (("v0001", 1), ("v0002", 2))}
    from app.db import make_engine, upgrade

    db = make_engine(f"sqlite:///{root / 'enclave.db'}")
    upgrade(db)
    registry = Registry(db)
    for version, path in adapters.items():
        registry.add(version, base_model="tiny", base_model_hash="h", dataset_hash=version, path=str(path),
                     hyperparameters={}, metrics={})
    return model_dir, adapters, registry


def ask(text: str, n: int) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", text)], max_new_tokens=n)


def reference(model_dir: Path, adapter: Path | None, prompts: list[tuple[str, int]]) -> list[str]:
    """What a freshly loaded engine answers with this adapter fixed from the start."""
    loaded = load(model_dir, device="cpu", dtype="float32", lora_adapter=adapter, shared=False)
    engine = TransformersEngine(Path("unused"), name="ref")
    engine.start_sync(loaded)

    async def run():
        try:
            return [(await engine.generate(ask(p, n))).text for p, n in prompts]
        finally:
            await engine.close()

    return asyncio.run(run())


def test_promotion_switches_new_requests_and_spares_the_one_in_flight(setup):
    model_dir, adapters, registry = setup
    first, second = ("What colour is the mug?", LONG), ("Tell me the colour of the badge.", 12)
    ref1 = dict(zip(("a", "b"), reference(model_dir, adapters["v0001"], [first, second])))
    ref2 = reference(model_dir, adapters["v0002"], [second])[0]
    base = reference(model_dir, None, [second])[0]
    assert len({ref1["b"], ref2, base}) == 3  # the adapters really change the answer

    loaded = load(model_dir, device="cpu", dtype="float32", shared=False)
    engine = TransformersEngine(Path("unused"), name="tiny")
    engine.start_sync(loaded)
    watcher = AdapterWatcher(registry, engine, base_model="tiny", poll_seconds=0.05)

    async def scenario():
        registry.promote("v0001")
        assert await watcher.sync() == "v0001" and engine.adapter_version == "v0001"

        stream = engine.stream(ask(*first))
        parts, final = [], None
        chunks = stream.__aiter__()
        parts.append((await chunks.__anext__()).text)  # the first request is decoding now
        # Hold the decode loop between two steps (a real scheduler job) so the order of events is
        # fixed: the swap is requested and the next request queued while the first is mid-answer.
        gate = threading.Event()
        engine.scheduler.call_between_steps(lambda: gate.wait(30), lambda _r, _e: None)
        registry.promote("v0002")
        swap = asyncio.create_task(watcher.sync())
        late = asyncio.create_task(engine.generate(ask(*second)))
        for _ in range(3000):
            if engine.switching_adapter and engine.scheduler.waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert engine.switching_adapter and engine.adapter_version == "v0001" and not swap.done()
        assert engine.scheduler.running == 1  # the first request is still mid-answer
        gate.set()
        async for chunk in chunks:
            parts.append(chunk.text)
            final = chunk
        assert await swap == "v0002"
        result = await late
        # The next request after a rollback runs on v0001 again; after the last one, on the base model.
        registry.rollback()
        await watcher.sync()
        back = await engine.generate(ask(*second))
        registry.rollback()
        await watcher.sync()
        bare = await engine.generate(ask(*second))
        return "".join(parts), final, result, back, bare

    try:
        text, final, late, back, bare = asyncio.run(scenario())
    finally:
        asyncio.run(engine.close())
    assert text == ref1["a"] and final.adapter == "v0001"  # in flight: finished with the old adapter, untouched
    assert late.text == ref2 and late.adapter == "v0002"  # next one: the new adapter
    assert back.text == ref1["b"] and back.adapter == "v0001"
    assert bare.text == base and bare.adapter is None and engine.adapter_version is None


def test_watcher_refuses_an_adapter_for_another_base_model(setup, caplog):
    model_dir, adapters, registry = setup
    registry.add("v0003", base_model="other-model", base_model_hash="x", dataset_hash="v3",
                 path=str(adapters["v0002"]), hyperparameters={}, metrics={})
    loaded = load(model_dir, device="cpu", dtype="float32", shared=False)
    engine = TransformersEngine(Path("unused"), name="tiny")
    engine.start_sync(loaded)
    watcher = AdapterWatcher(registry, engine, base_model="tiny", poll_seconds=0.05)
    try:
        registry.promote("v0003")
        assert asyncio.run(watcher.sync()) is None
        assert engine.adapter_version is None and "trained on other-model" in caplog.text
    finally:
        registry.rollback()
        asyncio.run(engine.close())
