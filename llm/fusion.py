"""Fuse the projections that read the same input into one Linear (q/k/v; gate/up).

Why: on CPU every dynamic-int8 Linear call (fbgemm) pays a fixed cost to quantize its input and
set up the kernel, and the per-token ranges of ``llm/quantization.py`` add a few elementwise
passes per call. A Llama-style layer makes seven such calls per token, three of them (q, k, v)
and two more (gate, up) on the same input; one fused call per group makes it four. Measured on
the 2-core target with SmolLM2-135M (docs/benchmarks.md, "Generation"): 211 -> 121 Linear calls
per decode step.

How: the group's weights are concatenated (rows; biases too) into one ``nn.Linear`` registered on
the owning module (``fused_qkv`` on the attention block, ``fused_gate_up`` on the MLP) and each
original projection becomes a ``ProjectionSlice``: the first slice called with an input runs the
fused Linear and keeps the other outputs for its siblings, which take theirs when they are called
with the same tensor. The model's own forward code runs unchanged (no model-specific copy of it
to keep up with transformers), and each output is exactly what the separate Linear computed:
output rows do not interact, and the int8 input quantization depends only on the input.

Written by hand: transformers has no generic projection fusion for CPU inference (its fused
kernels come from the kernels hub, which is online-only and GPU-oriented).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# (owner attribute holding the projections, their names, the fused Linear's name)
_GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj"), "fused_qkv"),
    ("mlp", ("gate_proj", "up_proj"), "fused_gate_up"),
)


class _SharedOutput:
    """The fused output of one input, handed out to the slices of a group."""

    __slots__ = ("owner", "name", "sizes", "x", "parts", "pending")

    def __init__(self, owner: nn.Module, name: str, sizes: list[int]):
        self.owner, self.name, self.sizes = owner, name, sizes
        self.x: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.pending: set[int] = set()


class ProjectionSlice(nn.Module):
    """Stands in for one projection of a fused group; computes the whole group once per input."""

    def __init__(self, shared: _SharedOutput, index: int, in_features: int):
        super().__init__()
        # A plain attribute, not a submodule: the fused Linear is registered once, on the owner
        # (so quantization swaps it once and state_dict holds it once).
        self._shared = shared
        self.index = index
        self.in_features = in_features
        self.out_features = shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._shared
        if s.x is not x or self.index not in s.pending:
            # A new input (or this slice asked twice for the same one): compute the group again.
            s.parts = getattr(s.owner, s.name)(x).split(s.sizes, dim=-1)
            s.x, s.pending = x, set(range(len(s.sizes)))
        s.pending.discard(self.index)
        out = s.parts[self.index]
        if not s.pending:  # every sibling served: hold no reference to the input or outputs
            s.x, s.parts = None, ()
        return out

    def extra_repr(self) -> str:
        return f"slice {self.index} of {self._shared.name}, in_features={self.in_features}, out_features={self.out_features}"


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every decoder layer in place; returns the number of groups fused.

    Only groups of plain ``nn.Linear`` with the same input size are fused (a LoRA-wrapped or
    already quantized projection is left alone), and only in models whose layers sit at
    ``model.model.layers`` (the decoder layout of the Llama family, Qwen, Mistral and GLM).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return 0
    fused = 0
    for layer in layers:
        for owner_name, names, fused_name in _GROUPS:
            owner = getattr(layer, owner_name, None)
            parts = [getattr(owner, n, None) for n in names]
            if owner is None or hasattr(owner, fused_name) or not all(type(p) is nn.Linear for p in parts):
                continue
            if len({p.in_features for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
                continue
            owner.add_module(fused_name, _concat(parts))
            shared = _SharedOutput(owner, fused_name, [p.out_features for p in parts])
            for i, n in enumerate(names):
                setattr(owner, n, ProjectionSlice(shared, i, parts[0].in_features))
            fused += 1
    if fused:
        log.info("fused %d projection groups (q/k/v, gate/up)", fused)
    return fused


def _concat(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    has_bias = any(p.bias is not None for p in parts)
    out = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=has_bias,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts], dim=0))
        if has_bias:
            out.bias.copy_(torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                                      for p in parts]))
    out.requires_grad_(False)
    return out
