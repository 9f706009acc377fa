"""Continuous batching for the in-process transformers engine.

One background thread owns the model and runs the decode loop. Requests (``Sequence``) are queued
from any thread; between two decode steps the loop

1. drops rows whose consumer went away (``Sequence.cancel``),
2. admits waiting requests within the limits (``max_batch_size``, ``max_batch_tokens``), prefills
   them (grouped by length, on their shared prefix, see below) and samples each one's first token
   from the prefill logits (that is the time to first token), and
3. merges their KV caches into the running batch and runs one decode step for every row at once.

The running batch is ONE ``DynamicCache``-shaped cache whose rows are left-padded to a common
length, with a 2-D attention mask (0 on the padding) and explicit ``position_ids`` per row, so a
row computes exactly what it would compute alone (the padding is masked out, positions are the
row's own). This is the same layout ``generate`` uses for a padded batch, so every decoder model
with a standard full-attention cache works without model-specific code.

Why this design (measured on the 2-core CPU this project targets, SmolLM2-135M; see
docs/benchmarks.md):

* transformers' own continuous batching (``generate_batch`` / paged attention) works on CPU but
  decoded ~3x slower than a plain padded batch here: its paged kernels are written for GPUs.
* Keeping one cache per request and padding them together every step costs a copy of the whole
  KV state per step; merging once, when a request joins, and selecting rows when one leaves, costs
  a copy only on those events.
* Requests admitted in the same step are prefilled together: grouped by prompt length (padding at
  most 25%), each group as one left-padded batch on top of the group's common prefix (the chat
  template's system turn, the RAG rules), which is computed once. A prefix that a recent request
  already computed comes from ``llm/prefix_cache.py`` instead. Measured: 16 prefills of ~38 tokens
  3.0 s one by one -> 0.83 s grouped (int8), because a call's Python and per-call costs are paid
  once and the shared part once. A lone request with no cached prefix runs exactly as before (a
  batch of one, no padding). A token budget per step (``prefill_token_budget``) bounds how long
  the running rows wait while a burst of new requests is prefilled.
* The cache layers append into spare capacity (``GrowableLayer``) instead of ``torch.cat``-ing
  the whole cache on every step as ``DynamicLayer`` does.
* Decode steps of Llama, Mistral and Qwen2 models on CPU go through ``llm/lean_decode.py``: the
  same arithmetic as the model's forward, bit for bit, without its per-call glue (7-16% per step).

Text (detokenisation, stop strings) is not handled here: the engine does it on the consumer side,
so this module deals only in token ids.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from llm.engine import EngineBusy, EngineError
from llm.lean_decode import lean_decoder
from llm.prefix_cache import MIN_PREFIX_TOKENS, LayerKV, PrefixCache, common_prefix

log = logging.getLogger(__name__)

# on_event(token_id, finish_reason, error): called from the scheduler thread for every sampled
# token (finish_reason "stop" on EOS, "length" at the token limit), or once with an error.
EventCallback = Callable[[int | None, str | None, BaseException | None], None]

# step_observer(batch_size): called from the scheduler thread after every decode step with the
# number of rows decoded together. The service turns it into a metric; this module stays free of
# any metrics library (a plain call per step, nothing when no observer is set).
StepObserver = Callable[[int], None]

# prefill_observer(computed, cached): called after every prefill with the prompt tokens that went
# through the model and those taken from a cached or shared prefix instead (they sum to the prompt
# tokens of the requests prefilled).
PrefillObserver = Callable[[int, int], None]


class Sequence:
    """One request, at the token level. Created by the engine, owned by the scheduler once submitted."""

    def __init__(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        on_event: EventCallback,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
    ):
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.repetition_penalty = repetition_penalty
        self.no_repeat_ngram = no_repeat_ngram
        self.output_ids: list[int] = []  # tokens sampled so far (the guards look at these only)
        self.on_event = on_event
        self.cancelled = False  # written by the consumer (any thread), read between steps
        # Scheduler state.
        self.generator: torch.Generator | None = None
        self.generated = 0  # tokens sampled so far
        self.last_token = -1  # sampled but not yet fed to the model
        self.length = 0  # tokens held in this row's KV cache
        self.tag: object = None  # the scheduler's tag when admitted (the engine's adapter version)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at the next step boundary (thread-safe)."""
        self.cancelled = True


class GrowableLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare capacity.

    ``DynamicLayer.update`` concatenates the new key/value onto the whole cache on every step, so
    a step copies the entire KV state (hundreds of MB per step for a 32-row batch). Here the
    tensors live in a buffer with room to grow and ``keys``/``values`` are views of its filled
    part; a step writes one column. The scheduler replaces the tensors wholesale with ``assign``
    when rows join or leave.
    """

    def __init__(self):
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self._kbuf = self._vbuf = None  # the next update reallocates with spare room
        if not self.is_initialized:
            self.device = keys.device
            self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = None
        used = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
        new = key_states.shape[-2]
        if self._kbuf is None or used + new > self._kbuf.shape[-2]:
            capacity = used + new + max(32, (used + new) // 4)
            self._kbuf = self._grow(self.keys, key_states, used, capacity)
            self._vbuf = self._grow(self.values, value_states, used, capacity)
        self._kbuf[..., used : used + new, :] = key_states
        self._vbuf[..., used : used + new, :] = value_states
        self.keys = self._kbuf[..., : used + new, :]
        self.values = self._vbuf[..., : used + new, :]
        return self.keys, self.values

    @staticmethod
    def _grow(old: torch.Tensor | None, like: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        if used:
            buf[..., :used, :] = old
        return buf

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowableLayer() for _ in range(num_layers)])


# Rows that joined together: their sequences, their cache (one row each, left-padded to a common
# width) and its attention mask [rows, width] (1 = a real token).
Block = tuple[list["Sequence"], Cache, torch.Tensor]

# A group of prompts prefilled in one call may pad its shorter prompts by at most this share of
# its real tokens (padding is computed and thrown away).
_PAD_LIMIT = 1.25


def _groups(seqs: list["Sequence"]) -> list[list["Sequence"]]:
    """Split requests into runs of similar prompt length (shortest first) that pad little when batched."""
    groups: list[list[Sequence]] = []
    total = 0
    for s in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        n = len(s.prompt_ids)  # the longest so far, since sorted
        if groups and n * (len(groups[-1]) + 1) <= _PAD_LIMIT * (total + n):
            groups[-1].append(s)
            total += n
        else:
            groups.append([s])
            total = n
    return groups


def guard_logits(logits: torch.Tensor, generated: list[int], penalty: float, ngram: int) -> None:
    """Decoding guards on one row's logits, in place, over the tokens generated so far.

    ``penalty``: the CTRL/transformers repetition penalty (a positive logit divided by it, a
    negative one multiplied) for every token already generated; ``ngram``: tokens that would repeat
    an n-gram already generated are banned (transformers' ``no_repeat_ngram_size``). Written here
    rather than taken from transformers' logits processors because those look at the whole input,
    prompt included, and penalising the prompt stops a RAG answer from copying a figure from its
    context.
    """
    if penalty != 1.0 and generated:
        index = torch.tensor(sorted(set(generated)), device=logits.device)
        values = logits.index_select(0, index)
        logits.index_copy_(0, index, torch.where(values > 0, values / penalty, values * penalty))
    if ngram > 0 and len(generated) >= ngram:
        prefix = tuple(generated[len(generated) - ngram + 1 :])
        banned = {generated[i + ngram - 1] for i in range(len(generated) - ngram + 1)
                  if tuple(generated[i : i + ngram - 1]) == prefix}
        if banned:
            logits[list(banned)] = float("-inf")


def _layer_kv(cache: Cache, row: int, length: int) -> list[LayerKV]:
    return [(layer.keys[row : row + 1, :, :length], layer.values[row : row + 1, :, :length]) for layer in cache.layers]


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchScheduler:
    """The decode loop: a background thread, a waiting queue and one running batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Iterable[int],
        context_window: int,
        max_batch_size: int = 16,
        max_batch_tokens: int = 16384,
        max_queue: int = 64,
        prefill_token_budget: int = 1024,
        prefix_cache_tokens: int = 4096,
        step_observer: StepObserver | None = None,
        prefill_observer: PrefillObserver | None = None,
        lean_decode: bool = True,
    ):
        self.model = model
        self.step_observer = step_observer
        self.prefill_observer = prefill_observer
        self.device = next(model.parameters()).device
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.context_window = context_window
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        # Keys/values of recent prompt prefixes (llm/prefix_cache.py); 0 tokens turns it off.
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers

        # transformers 5 renamed the cache argument and output from past_key_values to cache;
        # remote-code models keep the old name.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        # Decode steps of Llama-family models skip transformers' per-call glue (llm/lean_decode.py);
        # rebuilt after every job, since a job may change the modules (attaching a LoRA adapter).
        # ``lean_decode=False`` keeps the model's forward for every step (benchmarks compare both).
        self.lean_decode = lean_decode
        self._lean = self._build_lean()

        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running_count = 0  # len(self._rows), readable under the lock by submit()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Running batch; touched only by the scheduler thread.
        self._rows: list[Sequence] = []
        self._cache: Cache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 1 = real token
        # Between-step jobs (e.g. swapping a LoRA adapter) run on the scheduler thread.
        self._jobs: deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = deque()
        # Jobs that must not run while any row is decoding (swapping the weights every row computes
        # with): admission pauses while one is pending, the running rows finish, then it runs.
        self._idle_jobs: deque[tuple[Callable[[], object], Callable[[object, BaseException | None], None]]] = deque()
        # What the model computes with now (set by idle jobs, e.g. an adapter version); every
        # admitted Sequence records it, so each answer can say which weights produced it.
        self.tag: object = None
        # Counters for benchmarks and metrics.
        self.steps = 0
        self.decoded_tokens = 0
        self.prefill_tokens = 0  # prompt tokens run through the model (cached prefixes excluded)

    # --- public API (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="enclave-batching", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises ``EngineBusy`` at once when the waiting queue is full."""
        with self._cond:
            if self._closing:
                raise EngineError("the generation engine is shut down")
            # Places given back (a client that left before its request was admitted) are free again.
            if any(s.cancelled for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.cancelled)
            # Requests that will get a free slot at the next step do not count as waiting.
            free_slots = max(0, self.max_batch_size - self._running_count)
            if len(self._waiting) >= self.max_queue + free_slots:
                raise EngineBusy(
                    f"generation queue is full ({self.max_batch_size} running, {len(self._waiting)} waiting); "
                    "retry later"
                )
            self._waiting.append(seq)
            self._cond.notify()

    def call_between_steps(self, fn: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        """Run ``fn`` on the scheduler thread between two steps, then ``done(result, error)``."""
        with self._cond:
            self._jobs.append((fn, done))
            self._cond.notify()

    def call_when_idle(self, fn: Callable[[], object], done: Callable[[object, BaseException | None], None]) -> None:
        """Run ``fn`` on the scheduler thread once no request is running; new requests wait meanwhile.

        Requests already decoding finish with the weights they started with; those admitted after
        ``fn`` see its effect. Running rows always finish (token limits), so the wait is bounded by
        the longest answer in flight.
        """
        with self._cond:
            self._idle_jobs.append((fn, done))
            self._cond.notify()

    @property
    def idle_jobs_pending(self) -> int:
        """Jobs waiting for the running batch to drain (admission is paused while there are any)."""
        return len(self._idle_jobs)

    @property
    def running(self) -> int:
        return self._running_count

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the loop (scheduler thread) ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._rows or self._jobs or self._idle_jobs):
                    self._cond.wait()
                if self._closing:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, done in jobs:
                self._run_job(fn, done)
            if self._idle_jobs:
                with torch.inference_mode():
                    self._drop([i for i, s in enumerate(self._rows) if s.cancelled])
                if not self._rows:
                    with self._cond:
                        idle = list(self._idle_jobs)
                        self._idle_jobs.clear()
                    for fn, done in idle:
                        self._run_job(fn, done)
                    if self.prefix_cache is not None:  # computed with the weights before the job
                        self.prefix_cache.clear()
            admitted: list[Sequence] = []
            try:
                with torch.inference_mode():
                    self._drop([i for i, s in enumerate(self._rows) if s.cancelled])
                    admitted = self._admit()
                    self._merge(self._prefill(admitted))
                    if self._rows:
                        self._decode_step()
                with self._cond:
                    self._running_count = len(self._rows)
            except Exception as exc:  # a failed step fails every request in flight, not the engine
                log.exception("generation step failed")
                error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                for s in {id(s): s for s in [*self._rows, *admitted]}.values():
                    self._notify(s, None, None, error)
                self._drop(list(range(len(self._rows))))
        # Shutting down: whoever is still waiting or running gets an error instead of hanging.
        error = EngineError("the generation engine was shut down")
        with self._cond:
            pending = [*self._rows, *self._waiting]
            self._waiting.clear()
            idle = list(self._idle_jobs)
            self._idle_jobs.clear()
        for _fn, done in idle:
            done(None, error)
        for s in pending:
            self._notify(s, None, None, error)
        self._drop(list(range(len(self._rows))))

    def _run_job(self, fn, done) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:
            result, error = None, exc
        self._lean = self._build_lean()
        done(result, error)

    def _build_lean(self):
        return lean_decoder(self.model) if self.lean_decode else None

    def _final_length(self, s: Sequence) -> int:
        return min(len(s.prompt_ids) + s.max_new_tokens, self.context_window)

    def _admit(self) -> list[Sequence]:
        """Take waiting requests, in order, while they fit.

        ``max_batch_tokens`` bounds the KV memory of the batch *with its padding*: rows x the longest
        final length (prompt + max_new_tokens) among them, a worst case the batch can never exceed,
        so nothing ever has to be evicted. A request is always admitted into an empty batch, so one
        larger than the limit runs alone instead of waiting forever.
        """
        taken: list[Sequence] = []
        if self._idle_jobs:
            return taken  # draining the batch for a job that needs it empty
        longest = max((self._final_length(s) for s in self._rows), default=0)
        prefill = 0
        with self._cond:
            while self._waiting:
                s = self._waiting[0]
                if s.cancelled:
                    self._waiting.popleft()
                    continue
                rows = len(self._rows) + len(taken) + 1
                grown = max(longest, self._final_length(s))
                if rows > 1 and (rows > self.max_batch_size or rows * grown > self.max_batch_tokens):
                    break
                if taken and prefill + len(s.prompt_ids) > self.prefill_token_budget:
                    break
                self._waiting.popleft()
                s.tag = self.tag
                taken.append(s)
                longest, prefill = grown, prefill + len(s.prompt_ids)
            self._running_count = len(self._rows) + len(taken)
        return taken

    def _forward(self, input_ids, *, attention_mask=None, position_ids=None, cache=None):
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1  # the lm_head over the whole prompt would be wasted work
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, seqs: list[Sequence]) -> list[Block]:
        """Prefill the admitted requests in groups of similar length; one block per group."""
        blocks = []
        for group in _groups(seqs):
            block = self._prefill_group(group)
            if block is not None:
                blocks.append(block)
        return blocks

    def _prefill_group(self, group: list[Sequence]) -> Block | None:
        """One forward call for the group's prompts (left-padded), on a shared prefix computed once.

        The prefix is the group's common prefix (the chat template's system turn, the RAG
        instructions), taken from the prefix cache when a recent request already computed it; the
        rest of each prompt goes through the model as one padded batch. Returns the rows that go on
        decoding with their cache and mask (None when every row ended at its first token).
        """
        n = len(group)
        for s in group:
            if s.temperature > 0:
                s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        prompts = [torch.tensor(s.prompt_ids) for s in group]
        limit = min(p.numel() for p in prompts) - 1  # every row keeps at least one token to run
        shared = limit if n > 1 else 0
        for p in prompts[1:]:
            shared = min(shared, common_prefix(prompts[0], p))
        prefix_len, stored, computed = 0, None, 0
        if self.prefix_cache is not None:
            prefix_len, stored = self.prefix_cache.lookup(prompts[0], self.tag, shared if n > 1 else limit)
        prefix: Cache | None = None
        if stored is not None:
            prefix = new_cache(self.num_layers)
            for layer, (k, v) in zip(prefix.layers, stored):
                layer.assign(k, v)
        if n > 1 and shared > prefix_len and shared >= MIN_PREFIX_TOKENS:
            # Run the part of the common prefix not stored yet, once, as a batch of one.
            prefix = prefix if prefix is not None else new_cache(self.num_layers)
            ids = prompts[0][prefix_len:shared].unsqueeze(0).to(self.device)
            positions = torch.arange(prefix_len, shared, device=self.device).unsqueeze(0)
            self._forward(ids, position_ids=positions, cache=prefix)
            prefix_len = shared
            computed += ids.shape[1]
            if self.prefix_cache is not None:
                self.prefix_cache.store(prompts[0][:shared], self.tag, _layer_kv(prefix, 0, shared))

        suffixes = [p[prefix_len:] for p in prompts]
        width = max(x.numel() for x in suffixes)
        pads = [width - x.numel() for x in suffixes]
        cache = new_cache(self.num_layers)
        if prefix is not None:
            for layer, held in zip(cache.layers, prefix.layers):
                layer.assign(held.keys[:, :, :prefix_len].expand(n, -1, -1, -1),
                             held.values[:, :, :prefix_len].expand(n, -1, -1, -1))
        ids = torch.stack([_pad_left(x, k, 0) for x, k in zip(suffixes, pads)]).to(self.device)
        mask = torch.ones(n, prefix_len + width, dtype=torch.long, device=self.device)
        for row, k in enumerate(pads):
            mask[row, prefix_len : prefix_len + k] = 0
        offsets = torch.tensor(pads, device=self.device).unsqueeze(1)
        positions = (prefix_len + torch.arange(width, device=self.device).unsqueeze(0) - offsets).clamp_(min=0)
        padded = any(pads)
        logits = self._forward(ids, attention_mask=mask if padded else None,
                               position_ids=positions if (padded or prefix_len) else None, cache=cache)
        computed += sum(x.numel() for x in suffixes)
        self.prefill_tokens += computed
        self._observe(self.prefill_observer, computed, sum(p.numel() for p in prompts) - computed)
        if padded:
            # Padding columns are masked out, but their keys/values must not be NaN (a fully masked
            # query row can produce NaN, and 0 x NaN is NaN in the attention's weighted sum).
            padding = (mask == 0)[:, None, :, None]  # [rows, 1, columns, 1]: broadcast over heads and dims
            for layer in cache.layers:
                layer.keys.masked_fill_(padding, 0)
                layer.values.masked_fill_(padding, 0)
        if self.prefix_cache is not None and n == 1:
            self.prefix_cache.store(prompts[0], self.tag, _layer_kv(cache, 0, prompts[0].numel()))
        keep = []
        for row, (s, token) in enumerate(zip(group, self._sample(group, logits))):
            s.length = len(s.prompt_ids)
            if not self._accept(s, token):
                keep.append(row)
        if not keep:
            return None
        if len(keep) < n:
            index = torch.tensor(keep, device=self.device)
            for layer in cache.layers:
                layer.assign(layer.keys.index_select(0, index), layer.values.index_select(0, index))
            mask = mask.index_select(0, index)
        return [group[i] for i in keep], cache, mask

    def _merge(self, blocks: list[Block]) -> None:
        """Append the new rows to the running batch, left-padding everyone to a common length."""
        if not blocks:
            return
        current = self._mask.shape[1] if self._rows else 0
        width = max([current] + [mask.shape[1] for _, _, mask in blocks])
        masks = [_pad_left(self._mask, width - current, 1)] if self._rows else []
        masks += [_pad_left(mask, width - mask.shape[1], 1) for _, _, mask in blocks]
        if self._cache is None:
            self._cache = new_cache(self.num_layers)
        for i in range(self.num_layers):
            layer = self._cache.layers[i]
            parts_k = [_pad_left(layer.keys, width - current, 2)] if self._rows else []
            parts_v = [_pad_left(layer.values, width - current, 2)] if self._rows else []
            for _, c, mask in blocks:
                parts_k.append(_pad_left(c.layers[i].keys, width - mask.shape[1], 2))
                parts_v.append(_pad_left(c.layers[i].values, width - mask.shape[1], 2))
            layer.assign(torch.cat(parts_k, 0), torch.cat(parts_v, 0))
        self._mask = torch.cat(masks, 0)
        for seqs, _, _ in blocks:
            self._rows.extend(seqs)

    def _drop(self, indices: list[int]) -> None:
        """Remove finished or cancelled rows, then trim padding columns no row needs any more."""
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        with self._cond:
            self._running_count = len(self._rows)
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        # Rows are left-padded, so the first real column of each row is its first 1.
        trim = int(mask.argmax(dim=1).min())
        self._mask = mask[:, trim:]
        for layer in self._cache.layers:
            layer.assign(layer.keys.index_select(0, index)[:, :, trim:], layer.values.index_select(0, index)[:, :, trim:])

    def _decode_step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.last_token] for s in rows], device=self.device)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        if self._lean is not None:
            logits = self._lean(ids, self._mask, positions, self._cache)
        else:
            logits = self._forward(ids, attention_mask=self._mask, position_ids=positions, cache=self._cache)
        tokens = self._sample(rows, logits)
        self.steps += 1
        self.decoded_tokens += len(rows)
        self._observe(self.step_observer, len(rows))
        finished = []
        for i, (s, token) in enumerate(zip(rows, tokens)):
            s.length += 1
            if self._accept(s, token):
                finished.append(i)
        self._drop(finished)

    @staticmethod
    def _observe(observer: Callable[..., None] | None, *args: int) -> None:
        if observer is None:
            return
        try:
            observer(*args)
        except Exception:  # an observer must never break generation
            log.debug("observer failed", exc_info=True)

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Greedy for temperature 0; else temperature + nucleus sampling with the row's own generator."""
        if any(s.output_ids and (s.repetition_penalty != 1.0 or s.no_repeat_ngram > 0) for s in seqs):
            logits = logits.clone()
            for i, s in enumerate(seqs):
                guard_logits(logits[i], s.output_ids, s.repetition_penalty, s.no_repeat_ngram)
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked higher
                sorted_probs[before >= s.top_p] = 0.0  # the top token always stays
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
        return tokens

    def _accept(self, s: Sequence, token: int) -> bool:
        """Record a sampled token and tell the consumer; True when the sequence is finished."""
        s.generated += 1
        s.last_token = token
        if s.repetition_penalty != 1.0 or s.no_repeat_ngram > 0:
            s.output_ids.append(token)
        finish = None
        if token in self.eos:
            finish = "stop"
        elif s.generated >= s.max_new_tokens or len(s.prompt_ids) + s.generated >= self.context_window:
            finish = "length"
        self._notify(s, token, finish, None)
        return finish is not None or s.cancelled

    @staticmethod
    def _notify(s: Sequence, token, finish, error) -> None:
        try:
            s.on_event(token, finish, error)
        except Exception:  # the consumer's event loop is gone: nobody is listening any more
            log.debug("dropping a request whose consumer is gone", exc_info=True)
            s.cancel()
