"""The in-process transformers engine on the real bundled model (SmolLM2-135M, GGUF, fp32 on CPU).

The model is loaded once per session; every engine below shares it (an engine is only a scheduler
thread around the model). Answers are kept short so the file runs in a couple of minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path

import pytest
import torch

from app.container import Container
from app.settings import Settings
from llm.engine import ChatMessage, EngineBusy, EngineError, GenerationRequest, PromptTooLong, collect
from llm.loading import LoadedModel, load, quantized_copy
from llm.models import ModelStore
from llm.transformers_engine import TextStream, TransformersEngine

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def run(coro):
    return asyncio.run(coro)


def ask(text: str, **kw) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", text)], **kw)


@pytest.fixture(scope="session")
def smol(models_dir: Path) -> LoadedModel:
    resolved = ModelStore(models_dir).resolve(MODEL)
    return load(resolved.path, gguf_file=resolved.gguf_file, device="cpu", dtype="float32")


def make_engine(loaded: LoadedModel, **kw) -> TransformersEngine:
    engine = TransformersEngine(Path("unused"), name=MODEL, **kw)
    engine.start_sync(loaded)
    return engine


@pytest.fixture(scope="session")
def engine(smol):
    e = make_engine(smol, max_batch_size=8)
    yield e
    run(e.close())


@pytest.fixture(scope="session")
def alone(engine):
    """Greedy answers decoded with nothing else in the batch, memoised per (prompt, max_new_tokens)."""
    cache: dict[tuple[str, int], object] = {}

    def get(prompt: str, max_new_tokens: int = 24):
        if (prompt, max_new_tokens) not in cache:
            assert engine.scheduler.running == 0
            cache[prompt, max_new_tokens] = run(engine.generate(ask(prompt, max_new_tokens=max_new_tokens)))
        return cache[prompt, max_new_tokens]

    return get


def test_loads_gguf_with_its_chat_template(smol):
    assert smol.model_type == "llama"
    assert smol.dtype == torch.float32 and smol.device.type == "cpu"
    assert smol.max_context == 8192  # max_position_embeddings from the GGUF metadata
    assert smol.tokenizer.convert_tokens_to_ids("<|im_end|>") in smol.eos_token_ids
    assert "<|im_start|>" in smol.chat.template


def test_alone_equals_transformers_generate(smol, alone):
    """The scheduler's own decode loop reproduces model.generate (greedy) token for token."""
    prompt = "What is the capital of France?"
    ours = alone(prompt, 24)
    ids = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    expected = smol.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert ours.text == expected
    assert ours.text.startswith("The capital of France is Paris")


def test_greedy_inside_a_busy_batch_equals_alone(engine, alone):
    """A request decoded while others join and leave the batch mid-way gives the same tokens as alone."""
    target = "Name three colours of the rainbow."
    others = [
        ("What is the capital of France?", 6),
        ("Write a haiku about the sea.", 40),
        ("Give me a tip for staying healthy.", 12),
        ("What is 2 + 2?", 30),
    ]
    reference = alone(target, 32)
    seen_batch_sizes: list[int] = []

    async def scenario():
        async def background(prompt, n, after: asyncio.Event | None = None):
            if after is not None:
                await after.wait()
            return await engine.generate(ask(prompt, max_new_tokens=n))

        target_started = asyncio.Event()
        # Two requests are already running when the target arrives; two more join while it decodes.
        first = [asyncio.create_task(background(p, n)) for p, n in others[:2]]
        await asyncio.sleep(0)
        while engine.scheduler.running < 2:
            await asyncio.sleep(0.01)
        later = [asyncio.create_task(background(p, n, after=target_started)) for p, n in others[2:]]
        parts, final = [], None
        async for chunk in engine.stream(ask(target, max_new_tokens=32)):
            parts.append(chunk.text)
            seen_batch_sizes.append(engine.scheduler.running)
            target_started.set()
            final = chunk
        await asyncio.gather(*first, *later)
        return "".join(parts), final

    text, final = run(scenario())
    assert text == reference.text
    assert final.completion_tokens == reference.completion_tokens
    # The batch really changed around the target: others were present, and rows came and went.
    assert max(seen_batch_sizes) >= 3
    assert len(set(seen_batch_sizes)) >= 2


def test_requests_arriving_together_are_prefilled_together_on_a_shared_prefix(smol):
    """Prompts admitted in one step run as one padded prefill on their common prefix, computed once
    (and kept: a later request starts from it); every answer equals the one computed alone."""
    prompts = ["What is 2 + 2?", "Name three colours of the rainbow.", "Say hello.",
               "Explain in one sentence what a database index is.", "Why is the sky blue?"]
    plain = make_engine(smol, max_batch_size=1, prefix_cache_tokens=0)
    try:
        reference = [run(plain.generate(ask(p, max_new_tokens=12))).text for p in prompts]
    finally:
        run(plain.close())
    batched = make_engine(smol, max_batch_size=8)
    ids = [batched._encode([ChatMessage("user", p)]) for p in prompts]
    shared = next(i for i in range(min(map(len, ids))) if len({t[i] for t in ids}) > 1)
    scheduler = batched.scheduler

    async def together():
        hold = threading.Event()  # keep the scheduler busy until every request is queued
        scheduler.call_between_steps(hold.wait, lambda result, error: None)
        tasks = [asyncio.create_task(batched.generate(ask(p, max_new_tokens=12))) for p in prompts]
        while scheduler.waiting < len(prompts):
            await asyncio.sleep(0.01)
        hold.set()
        return [r.text for r in await asyncio.gather(*tasks)]

    try:
        assert run(together()) == reference
        # The system turn every prompt starts with went through the model once, not five times.
        assert shared >= 16
        assert scheduler.prefill_tokens == sum(map(len, ids)) - (len(prompts) - 1) * shared
        hits = scheduler.prefix_cache.hits
        again = run(batched.generate(ask("Say hello.", max_new_tokens=12)))
        assert again.text == reference[2]
        assert scheduler.prefix_cache.hits == hits + 1
    finally:
        run(batched.close())


def test_streaming_deltas_and_token_accounting(engine, smol):
    request = ask("Explain what a database index is.", max_new_tokens=20)

    async def stream():
        return [c async for c in engine.stream(request)]

    chunks = run(stream())
    final = chunks[-1]
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert final.finish_reason == "length" and final.completion_tokens == 20
    assert len(chunks) > 5  # streamed token by token, not in one piece
    text = "".join(c.text for c in chunks)
    expected_prompt = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": request.messages[0].content}], add_generation_prompt=True, tokenize=True,
    )
    if isinstance(expected_prompt, dict) or hasattr(expected_prompt, "keys"):
        expected_prompt = expected_prompt["input_ids"]
    assert final.prompt_tokens == len(expected_prompt) == engine.count_prompt_tokens(request.messages)
    # The generated tokens are what the tokenizer makes of the text (plain English round-trips).
    assert len(smol.tokenizer(text, add_special_tokens=False)["input_ids"]) == final.completion_tokens
    assert text == run(engine.generate(request)).text


def test_eos_ends_the_answer(alone):
    result = alone("What is the capital of France?", 24)
    assert result.finish_reason == "stop"  # <|im_end|> before the limit
    assert 0 < result.completion_tokens < 24
    assert "<|im_end|>" not in result.text


def test_stop_sequences_cut_the_text(engine, alone):
    full = alone("What is the capital of France?", 24).text  # "The capital of France is Paris..."
    for stop in ("France", "of Fr", "Paris"):
        result = run(engine.generate(ask("What is the capital of France?", max_new_tokens=24, stop=["zzz", stop])))
        assert result.finish_reason == "stop"
        assert result.text == full[: full.index(stop)]
        assert stop not in result.text
    # Streaming never leaks the beginning of a stop string before it is ruled out.
    async def stream():
        return [c.text async for c in engine.stream(ask("What is the capital of France?", max_new_tokens=24,
                                                         stop=["Paris"]))]
    assert "".join(run(stream())) == full[: full.index("Paris")]


def test_max_new_tokens_is_capped_by_the_engine(smol):
    capped = make_engine(smol, max_new_tokens=5)
    try:
        result = run(capped.generate(ask("Write a long story about a lighthouse.", max_new_tokens=100)))
    finally:
        run(capped.close())
    assert result.finish_reason == "length" and result.completion_tokens == 5


def test_seeded_sampling_is_reproducible(engine):
    def sample(seed):
        return run(engine.generate(ask("Write a sentence about cats.", max_new_tokens=12, temperature=1.0,
                                       top_p=0.95, seed=seed))).text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_closing_the_stream_frees_the_slot(smol):
    one_slot = make_engine(smol, max_batch_size=1, max_queue=1)

    async def scenario():
        long = one_slot.stream(ask("Write a long story about a lighthouse.", max_new_tokens=200))
        first = await anext(long)
        assert first.finish_reason is None and one_slot.scheduler.running == 1
        waiting = asyncio.create_task(one_slot.generate(ask("What is 2 + 2?", max_new_tokens=4)))
        while one_slot.scheduler.waiting == 0:
            await asyncio.sleep(0.01)
        await long.aclose()  # the client went away
        result = await asyncio.wait_for(waiting, timeout=300)  # a hang guard, not a timing assertion
        while one_slot.scheduler.running:  # the finished row leaves at the end of its last step
            await asyncio.sleep(0.01)
        return result

    try:
        result = run(scenario())
        assert result.completion_tokens == 4
        assert one_slot.scheduler.waiting == 0
    finally:
        run(one_slot.close())


def test_cancelling_the_consumer_task_frees_the_slot(smol):
    one_slot = make_engine(smol, max_batch_size=1, max_queue=0)

    async def scenario():
        got_one = asyncio.Event()

        async def consume():
            async for _ in one_slot.stream(ask("Write a long story about a lighthouse.", max_new_tokens=200)):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while one_slot.scheduler.running:  # dropped at the next step boundary
            await asyncio.sleep(0.01)
        return await one_slot.generate(ask("What is 2 + 2?", max_new_tokens=3))

    try:
        assert run(scenario()).completion_tokens == 3
    finally:
        run(one_slot.close())


def test_full_queue_is_busy_at_once(smol):
    small = make_engine(smol, max_batch_size=1, max_queue=1)

    async def scenario():
        running = small.stream(ask("Write a long story about a lighthouse.", max_new_tokens=200))
        await anext(running)
        queued = small.stream(ask("What is 2 + 2?", max_new_tokens=3))
        queued_task = asyncio.create_task(collect(queued))
        while small.scheduler.waiting == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineBusy):
            small.stream(ask("One more?", max_new_tokens=3))
        await running.aclose()
        return await queued_task

    try:
        assert run(scenario()).completion_tokens == 3
    finally:
        run(small.close())


def test_a_stream_holds_its_place_from_the_call_and_gives_it_back_unread(smol):
    """The place is taken when ``stream`` returns (a server can promise a stream), and given back
    by closing or dropping the stream, even one never read (a client that left before the stream
    started)."""
    small = make_engine(smol, max_batch_size=1, max_queue=0)

    async def free():
        while small.scheduler.running or small.scheduler.waiting:  # dropped at the next step boundary
            await asyncio.sleep(0.01)

    async def scenario():
        held = small.stream(ask("Write a long story about a lighthouse.", max_new_tokens=200))
        with pytest.raises(EngineBusy):  # the only place is taken although nothing was read yet
            small.stream(ask("What is 2 + 2?", max_new_tokens=3))
        await held.aclose()  # never read
        await free()
        dropped = small.stream(ask("Write a long story about a lighthouse.", max_new_tokens=200))
        with pytest.raises(EngineBusy):
            small.stream(ask("What is 2 + 2?", max_new_tokens=3))
        del dropped  # never read, never closed: garbage
        await free()
        return await small.generate(ask("What is 2 + 2?", max_new_tokens=3))

    try:
        assert run(scenario()).completion_tokens == 3
    finally:
        run(small.close())


def test_prompt_too_long(smol):
    tiny_window = make_engine(smol, context_window=256)
    try:
        messages = [ChatMessage("user", "word " * 300)]
        assert tiny_window.count_prompt_tokens(messages) > 256
        with pytest.raises(PromptTooLong):
            tiny_window.stream(GenerationRequest(messages))
        # A prompt that fits stops at the window instead of running past it.
        near = [ChatMessage("user", "word " * 200)]
        n = tiny_window.count_prompt_tokens(near)
        assert n < 256
        result = run(tiny_window.generate(GenerationRequest(near, max_new_tokens=500)))
        assert result.completion_tokens <= 256 - n
    finally:
        run(tiny_window.close())


def test_invalid_parameters(engine):
    with pytest.raises(EngineError):
        engine.stream(ask("hi", temperature=-1))
    with pytest.raises(EngineError):
        engine.stream(ask("hi", top_p=0))
    with pytest.raises(EngineError):
        engine.stream(GenerationRequest([]))


def test_text_stream_holds_back_stop_prefixes_and_partial_characters(smol):
    tok = smol.tokenizer
    ids = tok("Hello 世界, the end. More", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=[" the end", "XYZ"])
    out, stopped = [], False
    for t in ids:
        delta, stopped = stream.add(t)
        assert "\ufffd" not in delta
        out.append(delta)
        if stopped:
            break
    assert stopped and "".join(out) == "Hello 世界,"
    # Without stop strings everything comes out, and partial UTF-8 never shows.
    plain = TextStream(tok, stop=[])
    text = "".join(plain.add(t)[0] for t in ids) + plain.flush()
    assert text == "Hello 世界, the end. More"


HELD_OUT = Path(__file__).resolve().parents[1] / "bench" / "data" / "heldout_en.txt"


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())


def test_int8_perplexity_stays_within_5_percent_of_fp32(smol):
    """CPU int8 (calibrated SmoothQuant + per-token activation ranges) on a text the model never saw.

    One prefill pass over ~420 tokens: every Linear sees many rows at once, the case where one
    shared activation scale used to triple the perplexity (see llm/quantization.py).
    """
    int8 = quantized_copy(smol, "int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())  # lm_head included
    assert hasattr(int8.model.model.layers[0].self_attn, "fused_qkv")  # q/k/v quantized as one
    text = HELD_OUT.read_text()
    fp32_ppl, int8_ppl = perplexity(smol.model, smol.tokenizer, text), perplexity(int8.model, smol.tokenizer, text)
    assert fp32_ppl < 60  # the model reads the text at all
    assert abs(int8_ppl / fp32_ppl - 1) <= 0.05, (fp32_ppl, int8_ppl)
    # And it decodes: a greedy answer through the engine, in a batch with another request.
    engine = make_engine(int8, max_batch_size=2)
    try:
        async def both():
            return await asyncio.gather(*(engine.generate(ask(p, max_new_tokens=12))
                                          for p in ("What is the capital of France?", "Say hello.")))
        answers = run(both())
    finally:
        run(engine.close())
    assert all(a.completion_tokens > 0 and a.text.strip() for a in answers)


def test_fused_projections_compute_what_the_separate_ones_did(smol):
    """q/k/v and gate/up as one Linear each (llm/fusion.py): same logits, fewer calls."""
    from llm.fusion import ProjectionSlice, fuse_projections

    fused = copy.deepcopy(smol.model)
    layers = fused.config.num_hidden_layers
    assert fuse_projections(fused) == 2 * layers
    assert fuse_projections(fused) == 0  # already fused
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.q_proj, ProjectionSlice) and isinstance(mlp.up_proj, ProjectionSlice)
    assert attn.fused_qkv.out_features == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    calls = []
    for m in fused.modules():
        if type(m) is torch.nn.Linear:
            m.register_forward_hook(lambda *_: calls.append(1))
    ids = smol.tokenizer("The lighthouse keeper climbed the stairs", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected, got = smol.model(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4 * layers + 1  # qkv, o, gate_up, down per layer, and the lm_head


def test_int8_rows_keep_their_own_activation_range():
    """A token with huge activations in the same call must not flatten the other rows (per-token ranges)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from llm.quantization import quantize_int8_cpu

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    x = torch.randn(6, 64)
    x[0] *= 500  # a "massive activation" token (the first token of a prompt)
    with torch.no_grad():
        ref = layer(x)
    ours = quantize_int8_cpu(copy.deepcopy(layer))
    plain = quantize_dynamic(copy.deepcopy(layer), {"0": per_channel_dynamic_qconfig}, dtype=torch.qint8)

    def rel_error(model):  # worst relative error over the ordinary rows
        with torch.inference_mode():
            out = model(x)
        return float(((out - ref)[1:].norm(dim=1) / ref[1:].norm(dim=1)).max())

    assert rel_error(ours) < 0.03
    assert rel_error(plain) > 0.3  # what one shared scale does to the same rows
    with torch.inference_mode():  # a single row (one request decoding) takes the plain fbgemm path
        assert torch.allclose(ours(x[1:2]), ref[1:2], rtol=0.05, atol=0.05)


def test_int4_on_cpu_is_refused_clearly(smol):
    with pytest.raises(EngineError, match="int4 is not supported on CPU"):
        quantized_copy(smol, "int4")


def test_container_builds_the_configured_engine(models_dir, tmp_path):
    settings = Settings(
        data_dir=tmp_path, models_dir=models_dir,
        generation={"quantization": "int8", "max_batch_size": 4, "max_queue": 2, "context_window": 1024},
    )
    engine = Container(settings).generation_engine
    assert isinstance(engine, TransformersEngine)
    assert engine.name == MODEL and engine.context_window == 1024
    assert engine._load_args["quant"] == "int8" and engine._load_args["gguf_file"].endswith(".gguf")
    assert engine._limits["max_batch_size"] == 4 and engine._limits["max_queue"] == 2
