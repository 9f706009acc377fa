"""One decode step of a Llama-family decoder without transformers' per-call glue.

Why: on the 2-core CPU target a decode step of the bundled 135M model spends about as long in
Python and tiny tensor ops around the layers as in the int8 matrix products themselves (profiled
in docs/benchmarks.md, "Generation"). Much of that is glue that a one-token step does not need:
the attention mask rebuilt as a 4-D tensor by ``create_causal_mask`` on every call, keyword
plumbing through decorated ``forward`` methods, the attention-function registry, per-layer output
objects, the fused projections' bookkeeping (``llm/fusion.py``). This module runs the same layers
for ``q_len == 1`` with the glue cut down to what the step needs.

What it computes is the model's own arithmetic, op for op: it calls the model's modules (norms,
projections - plain, fused, quantized or LoRA-wrapped - the MLP activation, the rotary embedding)
and the architecture's own ``apply_rotary_pos_emb``, and it makes the same choice between SDPA's
grouped-query form and the packed form that transformers' ``sdpa_attention_forward`` makes, so
its logits are bit-for-bit those of ``model(...)`` (tests/test_lean_decode.py checks this).

Which models: only architectures whose decoder layer is exactly "pre-norm attention with rotary
q/k, pre-norm gated MLP" with full attention on every layer (Llama, Mistral without a sliding
window, Qwen2 without one) on CPU with the SDPA attention. Anything else (GLM, ChatGLM remote
code, a sliding window, another attention implementation, a GPU, where it was not measured)
keeps transformers' forward: ``lean_decoder`` returns None.

Written by hand: transformers has no lighter single-token forward for CPU (its compiled and
paged paths target GPUs; ``torch.compile`` of the layers measured no gain here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from llm.fusion import ProjectionSlice

# Architecture (class name) -> the decoder layer class name its layers must have.
_SUPPORTED = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
}

Projection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _projections(owner: nn.Module, names: tuple[str, ...], fused_name: str) -> Projection:
    """The outputs of ``names`` for one input: the fused Linear split, or each projection called."""
    modules = [getattr(owner, n) for n in names]
    fused = getattr(owner, fused_name, None)
    if fused is not None and all(isinstance(m, ProjectionSlice) for m in modules):
        sizes = [m.out_features for m in modules]
        return lambda x: fused(x).split(sizes, dim=-1)
    return lambda x: tuple(m(x) for m in modules)


def _full_attention(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2: the window is switched off
        return True
    return getattr(config, "sliding_window", None) is None


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """A ``LeanDecoder`` for ``model`` when its architecture is one this module reproduces exactly."""
    layer_class = _SUPPORTED.get(type(model).__name__)
    inner = getattr(model, "model", None)
    if layer_class is None or inner is None or model.training:
        return None
    config = model.config
    if config._attn_implementation != "sdpa" or not _full_attention(config):
        return None
    if next(model.parameters()).device.type != "cpu":
        return None
    if not all(type(layer).__name__ == layer_class for layer in inner.layers):
        return None
    rotary = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
    if rotary is None:
        return None
    return LeanDecoder(model, rotary)


class LeanDecoder:
    """``decoder(ids, mask, positions, cache)`` -> float logits of the last position, one row per sequence.

    ``ids`` and ``positions`` are [rows, 1]; ``mask`` is the running batch's 2-D mask [rows, cache
    length + 1] (1 = a real token, the new one included); ``cache`` is the batch's cache, to which
    every layer appends the new key and value.
    """

    def __init__(self, model: nn.Module, apply_rotary: Callable):
        self.model = model
        self.inner = model.model
        self.apply_rotary = apply_rotary
        config = model.config
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.layers = []
        for index, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                index, layer.input_layernorm, _projections(attn, ("q_proj", "k_proj", "v_proj"), "fused_qkv"),
                attn.o_proj, attn.head_dim, attn.scaling, layer.post_attention_layernorm,
                _projections(mlp, ("gate_proj", "up_proj"), "fused_gate_up"), mlp.act_fn, mlp.down_proj,
            ))

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        rows = ids.shape[0]
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        # transformers drops an all-ones mask (no padding) and lets SDPA use its grouped-query
        # form; with padding it passes a boolean [rows, 1, 1, length] mask and packs the heads of a
        # group as query rows. Both choices are kept, so the arithmetic is the same.
        attn_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for index, norm1, qkv, o_proj, head_dim, scaling, norm2, gate_up, act, down in self.layers:
            x = norm1(hidden)
            q, k, v = qkv(x)
            q = q.view(rows, 1, -1, head_dim).transpose(1, 2)
            k = k.view(rows, 1, -1, head_dim).transpose(1, 2)
            v = v.view(rows, 1, -1, head_dim).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            k, v = cache.layers[index].update(k, v)
            if self.groups == 1:
                out = sdpa(q, k, v, attn_mask=attn_mask, scale=scaling)
            elif attn_mask is None:
                out = sdpa(q, k, v, scale=scaling, enable_gqa=True)
            else:
                out = sdpa(q.reshape(rows, -1, self.groups, head_dim), k, v, attn_mask=attn_mask, scale=scaling)
            # [rows, heads, 1, dim] or the packed [rows, kv heads, group, dim]: heads in the same order.
            hidden = hidden + o_proj(out.reshape(rows, 1, -1))
            gate, up = gate_up(norm2(hidden))
            hidden = hidden + down(act(gate) * up)
        hidden = self.inner.norm(hidden)
        return self.model.lm_head(hidden[:, -1, :]).float()
