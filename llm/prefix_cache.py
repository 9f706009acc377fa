"""Reuse the KV cache of prompt prefixes that recent requests already computed.

Every request through the service starts with the same tokens: the chat template's system turn
and, for RAG, Enclave's fixed instructions. Prefilling those again for every request is most of
a short prompt's time to first token on CPU. The scheduler keeps the keys/values of recent
prefixes here and, for a new prompt, starts from the longest stored prefix it shares, computing
only the rest (what vLLM calls automatic prefix caching; this is the small, token-granular
version a single in-process batch needs: a handful of entries, a token budget, LRU).

An entry is tied to the scheduler's tag (the LoRA adapter version in use), since keys and values
depend on the weights. Stored tensors are never modified: a cache built from an entry copies it
on its first append (``GrowableLayer``).

Written by hand: transformers has no prefix cache for its dynamic caches.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# A shared prefix shorter than this is not worth reusing (a lookup and a copy) or, for a group of
# prompts, its own forward call.
MIN_PREFIX_TOKENS = 16

# keys and values of one layer, each [1, kv_heads, tokens, head_dim]
LayerKV = tuple[torch.Tensor, torch.Tensor]


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D token tensors."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


class PrefixCache:
    """Keys/values of recently prefilled prefixes, bounded by a total token budget (LRU)."""

    def __init__(self, max_tokens: int = 4096, min_tokens: int = MIN_PREFIX_TOKENS):
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, tuple[object, torch.Tensor, list[LayerKV]]] = OrderedDict()
        self._next_id = 0
        self.tokens = 0  # held now
        self.hits = 0
        self.reused_tokens = 0  # prompt tokens not prefilled thanks to the cache

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def lookup(self, prompt: torch.Tensor, tag: object, limit: int) -> tuple[int, list[LayerKV] | None]:
        """The longest stored prefix of ``prompt`` (at most ``limit`` tokens) and its layers, or (0, None).

        Prefixes shorter than ``min_tokens`` are not worth a second forward call and count as misses.
        """
        best, best_id = 0, None
        for key, (entry_tag, tokens, _layers) in self._entries.items():
            if entry_tag != tag:
                continue
            n = min(common_prefix(tokens, prompt), limit)
            if n > best:
                best, best_id = n, key
        if best < self.min_tokens or best_id is None:
            return 0, None
        self._entries.move_to_end(best_id)
        self.hits += 1
        self.reused_tokens += best
        layers = self._entries[best_id][2]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def store(self, tokens: torch.Tensor, tag: object, layers: list[LayerKV]) -> None:
        """Keep ``layers`` (one row, ``len(tokens)`` columns) unless an entry already covers them."""
        n = tokens.numel()
        if n < self.min_tokens or n > self.max_tokens:
            return
        for key, (entry_tag, held, _layers) in list(self._entries.items()):
            if entry_tag != tag:
                continue
            shared = common_prefix(held, tokens)
            if shared == n:  # already covered by a longer or equal entry
                self._entries.move_to_end(key)
                return
            if shared == held.numel():  # the new one extends this entry: replace it
                self._drop(key)
        while self._entries and self.tokens + n > self.max_tokens:
            self._drop(next(iter(self._entries)))
        compact = [(k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format))
                   for k, v in layers]
        self._entries[self._next_id] = (tag, tokens.clone(), compact)
        self._next_id += 1
        self.tokens += n

    def _drop(self, key: int) -> None:
        _tag, tokens, _layers = self._entries.pop(key)
        self.tokens -= tokens.numel()
