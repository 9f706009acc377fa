"""The lean decode step (llm/lean_decode.py) computes exactly what the model's own forward computes.

Tiny randomly initialised models of each supported architecture, built from a config (no
download): a padded batch is prefilled into the scheduler's cache, then decode steps run both
ways on copies of that cache. Logits must be identical, not merely close: greedy answers through
the engine must not change with the decode path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from llm.batching import new_cache
from llm.fusion import fuse_projections
from llm.lean_decode import lean_decoder
from llm.quantization import quantize_int8_cpu

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)


def tiny(config_class, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_class(**COMMON, **extra)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


ARCHITECTURES = {
    "llama-gqa": lambda: tiny(LlamaConfig, num_key_value_heads=2),
    "llama-mha": lambda: tiny(LlamaConfig, num_key_value_heads=4),
    "mistral": lambda: tiny(MistralConfig, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: tiny(Qwen2Config, num_key_value_heads=2, use_sliding_window=False),  # q/k/v with bias
}


def prefill(model, prompts: list[list[int]]):
    """Left-padded prefill into a fresh scheduler cache; returns (cache, mask, next positions)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = new_cache(model.config.num_hidden_layers)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return cache, mask, torch.tensor([[len(p)] for p in prompts])


def clone(cache, layers: int):
    copy_ = new_cache(layers)
    for mine, theirs in zip(copy_.layers, cache.layers):
        mine.assign(theirs.keys.clone(), theirs.values.clone())
    return copy_


def compare_steps(model, prompts: list[list[int]], steps: int = 3) -> None:
    lean = lean_decoder(model)
    assert lean is not None
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        cache, mask, positions = prefill(model, prompts)
        theirs, ours = cache, clone(cache, layers)
        tokens = torch.tensor([[p[-1]] for p in prompts])
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            expected = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=theirs,
                             use_cache=True).logits[:, -1, :].float()
            got = lean(tokens, mask, positions, ours)
            assert torch.equal(expected, got), (expected - got).abs().max()
            tokens, positions = expected.argmax(-1, keepdim=True), positions + 1
        for a, b in zip(theirs.layers, ours.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lean_step_equals_the_model_forward(arch: str):
    model = ARCHITECTURES[arch]()
    compare_steps(model, [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]])  # padded batch
    compare_steps(model, [[5, 6, 7, 8], [9, 10, 11, 12]])  # no padding: the all-ones mask
    compare_steps(model, [[3, 4, 5]])  # one row alone


def test_fused_and_int8_models_take_the_lean_step_too():
    model = ARCHITECTURES["llama-gqa"]()
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    compare_steps(fused, [[5, 6, 7, 8, 9], [11, 12, 13]])
    int8 = quantize_int8_cpu(copy.deepcopy(model))
    compare_steps(int8, [[5, 6, 7, 8, 9], [11, 12, 13]])


def test_other_layouts_keep_the_model_forward():
    assert lean_decoder(tiny(MistralConfig, num_key_value_heads=2, sliding_window=4)) is None  # a window
    assert lean_decoder(tiny(Qwen2Config, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                             max_window_layers=0)) is None
    eager = ARCHITECTURES["llama-gqa"]()
    eager.config._attn_implementation = "eager"
    assert lean_decoder(eager) is None
    training = ARCHITECTURES["llama-gqa"]().train()
    assert lean_decoder(training) is None


def test_a_lora_adapter_attached_by_a_job_is_used_by_the_lean_step():
    """The scheduler rebuilds its lean decoder after every job: one built before the adapter was
    attached would still call the bare projections."""
    import threading

    from peft import LoraConfig, inject_adapter_in_model

    from llm.batching import BatchScheduler

    model = ARCHITECTURES["llama-gqa"]()
    scheduler = BatchScheduler(model, eos_token_ids=[], context_window=256)
    before = scheduler._lean
    done = threading.Event()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    scheduler.start()
    try:
        scheduler.call_between_steps(lambda: inject_adapter_in_model(config, model), lambda *_: done.set())
        assert done.wait(60)
    finally:
        scheduler.close()
    assert scheduler._lean is not before
    compare_steps(model, [[5, 6, 7, 8, 9], [11, 12, 13]])  # lean and forward agree, LoRA included
    with torch.inference_mode():  # and the adapter changes the answer: the stale decoder is wrong
        cache, mask, positions = prefill(model, [[5, 6, 7]])
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        stale = before(torch.tensor([[7]]), mask, positions, clone(cache, 2))
        fresh = scheduler._lean(torch.tensor([[7]]), mask, positions, cache)
    assert not torch.allclose(stale, fresh)
