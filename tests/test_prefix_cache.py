"""The prompt-prefix KV store of the batching scheduler (llm/prefix_cache.py), on plain tensors."""

from __future__ import annotations

import torch

from llm.prefix_cache import PrefixCache, common_prefix


def kv(tokens: torch.Tensor, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fake per-layer keys/values whose every column records its token id (and the layer)."""
    col = tokens.float().view(1, 1, -1, 1).expand(1, 3, -1, 4)
    return [(col + 1000 * i, -col - 1000 * i) for i in range(layers)]


def test_common_prefix():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix(a, torch.tensor([1, 2])) == 2
    assert common_prefix(a, torch.tensor([7])) == 0
    assert common_prefix(a, torch.tensor([], dtype=torch.long)) == 0


def test_longest_stored_prefix_is_returned_up_to_the_limit():
    cache = PrefixCache(max_tokens=1000, min_tokens=4)
    system = torch.arange(20)
    cache.store(torch.cat([system, torch.tensor([100, 101, 102])]), None, kv(torch.cat([system, torch.tensor([100, 101, 102])])))
    prompt = torch.cat([system, torch.tensor([200, 201])])
    n, layers = cache.lookup(prompt, None, limit=prompt.numel() - 1)
    assert n == 20 and len(layers) == 2
    keys, values = layers[1]
    assert keys.shape == (1, 3, 20, 4) and torch.equal(keys[0, 0, :, 0], system.float() + 1000)
    assert torch.equal(values, -keys)
    assert cache.lookup(prompt, None, limit=12)[0] == 12
    assert cache.hits == 2 and cache.reused_tokens == 32


def test_short_matches_and_other_tags_miss():
    cache = PrefixCache(max_tokens=1000, min_tokens=8)
    tokens = torch.arange(30)
    cache.store(tokens, "adapter-v1", kv(tokens))
    assert cache.lookup(tokens, "adapter-v2", limit=29) == (0, None)  # other weights, other keys/values
    assert cache.lookup(torch.cat([tokens[:5], torch.tensor([99])]), "adapter-v1", limit=5) == (0, None)
    assert cache.lookup(tokens, "adapter-v1", limit=29)[0] == 29


def test_store_keeps_no_view_of_the_callers_tensors():
    cache = PrefixCache(max_tokens=1000, min_tokens=4)
    tokens = torch.arange(10)
    layers = [(torch.zeros(1, 3, 10, 4), torch.zeros(1, 3, 10, 4))]
    cache.store(tokens, None, layers)
    layers[0][0].fill_(5)  # the scheduler reuses its buffers
    assert cache.lookup(tokens, None, limit=9)[1][0][0].abs().sum() == 0


def test_token_budget_evicts_least_recently_used_and_extensions_replace():
    cache = PrefixCache(max_tokens=50, min_tokens=4)
    a, b = torch.arange(20), torch.arange(100, 120)
    cache.store(a, None, kv(a))
    cache.store(b, None, kv(b))
    assert cache.tokens == 40 and len(cache) == 2
    cache.lookup(a, None, limit=19)  # a is now the most recently used
    c = torch.arange(200, 220)
    cache.store(c, None, kv(c))  # over budget: b goes
    assert len(cache) == 2 and cache.lookup(b, None, limit=19) == (0, None)
    assert cache.lookup(a, None, limit=19)[0] == 19
    longer_a = torch.cat([a, torch.tensor([7, 8])])
    cache.store(longer_a, None, kv(longer_a))  # extends a: replaces it, no second copy
    assert len(cache) == 2 and cache.tokens == 42
    cache.store(a[:10], None, kv(a[:10]))  # already covered
    assert cache.tokens == 42
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0
