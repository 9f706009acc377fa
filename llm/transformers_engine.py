"""The in-process engine: a transformers model behind continuous batching (``llm/batching.py``).

Threads: the asyncio side (the API) renders and tokenises prompts, turns token ids back into text
and applies stop strings; one scheduler thread owns the model and runs the decode loop. Each
request has its own ``asyncio.Queue``; the scheduler hands it tokens with
``loop.call_soon_threadsafe``, so nothing in the event loop ever blocks on the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from llm import chat_format
from llm.batching import BatchScheduler, PrefillObserver, Sequence, StepObserver
from llm.engine import (
    ChatMessage,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    HeldStream,
    PromptTooLong,
    collect,
)
from llm.loading import LoadedModel, load

log = logging.getLogger(__name__)


class TransformersEngine:
    """``Engine`` over a local HF folder or GGUF file, with continuous batching.

    ``stream`` checks the request and queues it at once (``PromptTooLong``, ``EngineBusy`` when the
    waiting queue is full, ``EngineError`` for invalid parameters), so a caller that got a stream
    holds a place and can promise an answer before it starts a response. Closing the stream (even
    unread), dropping it, or cancelling the task iterating it frees its place or batch slot at the
    next decode step.
    """

    supports_adapters = True

    def __init__(
        self,
        model_path: Path,
        *,
        name: str,
        gguf_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str = "none",
        trust_remote_code: bool = False,
        context_window: int | None = None,
        max_new_tokens: int = 512,
        max_batch_size: int = 16,
        max_batch_tokens: int = 16384,
        max_queue: int = 64,
        lora_adapter: Path | None = None,
        prefill_token_budget: int = 1024,
        prefix_cache_tokens: int = 4096,
        step_observer: StepObserver | None = None,
        prefill_observer: PrefillObserver | None = None,
        adapter_version: str | None = None,
        threads: int | None = None,
    ):
        self.name = name
        self.context_window = context_window or 0  # the model's own window once started, unless configured
        self.max_new_tokens = max_new_tokens
        self._load_args = dict(
            gguf_file=gguf_file, device=device, dtype=dtype, quant=quantization,
            trust_remote_code=trust_remote_code, lora_adapter=lora_adapter,
        )
        self._model_path = Path(model_path)
        self._configured_window = context_window
        self._limits = dict(
            max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
            prefill_token_budget=prefill_token_budget, prefix_cache_tokens=prefix_cache_tokens,
            step_observer=step_observer, prefill_observer=prefill_observer,
        )
        self._threads = threads
        self._loaded: LoadedModel | None = None
        self._scheduler: BatchScheduler | None = None
        self._start_lock = asyncio.Lock()
        # The version name of ``lora_adapter`` (attached at load time), reported with every answer.
        self._initial_adapter = adapter_version if lora_adapter is not None else None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._scheduler is not None:
                return
            # Loading takes seconds to minutes: keep the event loop responsive meanwhile.
            loaded = await asyncio.to_thread(load, self._model_path, **self._load_args)
            self.start_sync(loaded)

    def start_sync(self, loaded: LoadedModel) -> None:
        """Start on an already loaded model (benchmarks and tests share one model between engines)."""
        self._loaded = loaded
        if self._threads:
            # Process-wide; the scheduler thread, created below, picks it up for its first op.
            torch.set_num_threads(self._threads)
        self.context_window = self._configured_window or loaded.max_context
        self._scheduler = BatchScheduler(
            loaded.model, eos_token_ids=loaded.eos_token_ids, context_window=self.context_window, **self._limits
        )
        self._scheduler.tag = self._initial_adapter
        self._scheduler.start()

    async def close(self) -> None:
        if self._scheduler is not None:
            scheduler, self._scheduler = self._scheduler, None
            await asyncio.to_thread(scheduler.close)

    # --- LoRA adapters (hot swap) -------------------------------------------------------------

    @property
    def adapter_version(self) -> str | None:
        """The adapter version new requests are answered with (None: the base model)."""
        return self._scheduler.tag if self._scheduler is not None else self._initial_adapter

    @property
    def switching_adapter(self) -> bool:
        """True while a requested adapter switch waits for the requests in flight to finish."""
        return self._scheduler is not None and self._scheduler.idle_jobs_pending > 0

    async def switch_adapter(self, version: str | None, path: Path | None) -> None:
        """Serve with the peft adapter at ``path`` (``version=None``: the base model), without a restart.

        The adapter is loaded beside the base weights (the base is never touched) and becomes active
        between two decode steps once no request is running: answers in flight finish with the
        adapter they started with, new ones wait for the swap (at most the longest answer in
        flight) and then use the new one. The previous adapter is unloaded afterwards. Raises
        ``EngineError`` when the adapter cannot be loaded; the old one keeps serving then.
        """
        scheduler = self.scheduler
        if version == scheduler.tag:
            return
        if version is not None and path is None:
            raise EngineError("switch_adapter needs the adapter folder")
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error) -> None:  # scheduler thread
            def settle():
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error if isinstance(error, EngineError) else
                                         EngineError(f"cannot switch to adapter {version}: {error}"))
                else:
                    future.set_result(result)
            loop.call_soon_threadsafe(settle)

        def swap() -> None:  # scheduler thread, no request running
            _apply_adapter(self.loaded.model, version, path)
            scheduler.tag = version

        scheduler.call_when_idle(swap, done)
        await future
        log.info("now serving with adapter %s", version or "none (base model)")

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineError("the generation engine is not started")
        return self._loaded

    def queue_state(self) -> dict[str, int] | None:
        """Requests running and waiting, and the limits they fill (None before ``start``)."""
        scheduler = self._scheduler
        if scheduler is None:
            return None
        return {"running": scheduler.running, "waiting": scheduler.waiting,
                "max_running": scheduler.max_batch_size, "max_waiting": scheduler.max_queue}

    @property
    def scheduler(self) -> BatchScheduler:
        if self._scheduler is None:
            raise EngineError("the generation engine is not started")
        return self._scheduler

    # --- requests -----------------------------------------------------------------------------

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self._encode(messages))

    def _encode(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise EngineError("a request needs at least one message")
        return chat_format.encode(self.loaded.tokenizer, self.loaded.chat, messages)

    async def open(self, request: GenerationRequest) -> HeldStream:
        """Queued now (fails fast: EngineBusy, PromptTooLong, ValueError); see llm/engine.py."""
        return self.stream(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        scheduler = self.scheduler
        prompt = self._encode(request.messages)
        if len(prompt) + 1 > self.context_window:
            raise PromptTooLong(
                f"the prompt is {len(prompt)} tokens; the model's context window is {self.context_window} "
                "tokens and must leave room for at least one generated token"
            )
        if request.temperature < 0 or not 0 < request.top_p <= 1 or request.max_new_tokens < 1:
            raise EngineError("invalid sampling parameters: temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
        max_new = min(request.max_new_tokens, self.max_new_tokens, self.context_window - len(prompt))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(token, finish, error) -> None:  # scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, (token, finish, error))

        seq = Sequence(
            prompt, max_new_tokens=max_new, on_event=on_event, temperature=request.temperature,
            top_p=request.top_p, seed=request.seed, repetition_penalty=request.repetition_penalty,
            no_repeat_ngram=request.no_repeat_ngram,
        )
        # The request takes its place in the queue now (EngineBusy at once when there is none, under
        # the scheduler's lock, so no check can go stale before the request is queued); closing or
        # dropping the returned stream, even before its first item, gives the place back.
        scheduler.submit(seq)
        return HeldStream(self._run(seq, events, prompt, request), seq.cancel)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await collect(self.stream(request))

    async def _run(
        self, seq: Sequence, events: asyncio.Queue, prompt: list[int], request: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        text = TextStream(self.loaded.tokenizer, request.stop)
        tokens = 0
        try:
            while True:
                # Drain everything already there: a slow consumer gets fewer, larger chunks.
                pending = [await events.get()]
                while not events.empty():
                    pending.append(events.get_nowait())
                delta: list[str] = []
                finish = None
                for token, finish, error in pending:
                    if error is not None:
                        raise error
                    tokens += 1
                    piece, stopped = text.add(token)
                    delta.append(piece)
                    if stopped:
                        finish = "stop"
                    if finish:
                        break
                if finish:
                    if finish != "stop" or not text.stopped:
                        delta.append(text.flush())
                    yield GenerationChunk("".join(delta), finish, len(prompt), tokens, seq.tag)
                    return
                if any(delta):
                    yield GenerationChunk("".join(delta), prompt_tokens=len(prompt), completion_tokens=tokens)
        finally:
            # Closed early, cancelled, failed, or stopped by a stop string the scheduler cannot
            # see: the row is dropped at the next step boundary (a no-op if it already finished).
            seq.cancel()


def _adapter_name(version: str) -> str:
    return "enclave_" + "".join(c if c.isalnum() else "_" for c in version)


def _apply_adapter(model, version: str | None, path: Path | None) -> None:
    """Make ``version`` the only active adapter of ``model`` (None: adapters off, the base model).

    Loading goes through transformers' ``load_adapter``; switching and unloading use peft's layer
    API directly (``BaseTunerLayer.set_adapter/enable_adapters/delete_adapter``), which is what
    transformers' wrappers of the same name do, because those wrappers demand a newer peft than
    the newest release available here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = getattr(model, "peft_config", None) if getattr(model, "_hf_peft_config_loaded", False) else None
    loaded = list(configs or {})
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if version is None:
        for layer in layers:
            layer.enable_adapters(False)
        return
    name = _adapter_name(version)
    if name not in loaded:
        from llm.loading import add_lora

        add_lora(model, path, name)
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(True)
        layer.set_adapter(name)
    for stale in (n for n in loaded if n != name):
        for layer in layers:
            if any(stale in getattr(layer, attr, {}) for attr in layer.adapter_layer_names):
                layer.delete_adapter(stale)
        model.peft_config.pop(stale, None)


class TextStream:
    """Incremental detokenisation with stop strings; the deltas concatenate to the final text.

    Each step decodes the whole answer so far (exact, and cheap next to a decode step) and emits
    what is new, holding back (a) a trailing incomplete UTF-8 character (shown by the tokenizer as
    U+FFFD until its remaining bytes arrive) and (b) a tail that could be the start of a stop
    string. When a stop string appears, the text ends just before it and it is not emitted.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text to emit, whether a stop string ended the answer)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            self.text, self.stopped = self.text[:cut], True
            return self._emit(cut), True
        end = len(self.text)
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        return self._emit(min(end, len(self.text) - self._stop_prefix_length())), False

    def flush(self) -> str:
        """Everything not emitted yet (at the end of the answer)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
