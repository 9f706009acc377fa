"""The one interface every generation engine implements (in-process transformers, remote OpenAI-compatible).

The contract, honoured by both engines and checked by tests/test_engine_contract.py:

* ``open(request)`` fails fast: everything that can be known before the first token is raised
  here, before the caller has promised anything to its client (an HTTP 200, a stream):
  ``EngineBusy`` (the queue is full, or the remote server answered 429/503: the API answers 503 +
  Retry-After), ``PromptTooLong`` (400), ``EngineError`` (remote unreachable or refusing: 502),
  ``ValueError`` for invalid sampling options. It returns a :class:`HeldStream` that holds the
  request's place (a queue slot, an open upstream response) until it is read to the end, closed
  (``aclose``) or released, even if it is never iterated.
* Reading the stream yields text deltas as they are decoded; the last chunk has ``finish_reason``
  and the token counts. A failure after text was streamed raises ``EngineError`` from the iterator
  (the answer was cut off; a stream is never retried once text has left).
* ``stream(request)`` is ``open`` plus reading, as one async iterator, for callers that have
  nothing to promise before the first token; ``generate`` collects it.
* ``adapter_version`` (the LoRA adapter in use, or None), ``queue_state()`` and
  ``switch_adapter()`` are part of the protocol: an engine that cannot serve adapters says so
  (``supports_adapters`` False, ``switch_adapter`` raises EngineError), so the application never
  probes engines with hasattr.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled"]


class EngineError(Exception):
    """A generation failed for a reason the caller should see (clear, user-facing message)."""


class EngineBusy(EngineError):
    """The waiting queue is full: answer 429/503 with Retry-After instead of hanging."""


class PromptTooLong(EngineError):
    """The prompt (after templating) cannot fit the model's context window with room to answer."""


@dataclass
class ChatMessage:
    role: Role
    content: str


@dataclass
class GenerationRequest:
    messages: list[ChatMessage]
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    request_id: str | None = None
    # Decoding guards over the generated tokens (the prompt is not penalised): 1.0 / 0 mean off.
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0


@dataclass
class GenerationChunk:
    """A streamed piece: ``text`` is the new text since the previous chunk.

    The last chunk of a stream has ``finish_reason`` set and carries the final token counts. Earlier
    chunks may carry the counts so far (the in-process engine does; 0 means unknown), so that a
    consumer that stops reading early (the loop guard, the verify policy) can still account for
    the tokens spent.
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    adapter: str | None = None  # on the last chunk: the LoRA adapter version that produced the answer


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None


@runtime_checkable
class Engine(Protocol):
    name: str  # the model name reported to clients (the remote model's id behind the openai engine)
    context_window: int  # tokens
    supports_adapters: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int: ...

    async def open(self, request: GenerationRequest) -> "HeldStream": ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    @property
    def adapter_version(self) -> str | None: ...

    def queue_state(self) -> dict[str, int] | None:
        """{running, waiting, max_running, max_waiting} of a local queue; None when there is none to report."""

    async def switch_adapter(self, version: str | None, path: Path | None) -> None: ...


class HeldStream:
    """A stream whose request already holds its place in an engine (a queue slot).

    Closing it gives the place back even when it was never iterated (closing an async generator
    that never started runs none of its code, so its ``finally`` cannot do it), and so does dropping
    it: a response that never started streaming must not leave a request generating for nobody.
    """

    def __init__(self, chunks: AsyncIterator, release: Callable[[], None]):
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> "HeldStream":
        return self

    async def __anext__(self):
        return await self._chunks.__anext__()

    def release(self) -> None:
        """Give the place back (thread-safe for the engines here; idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    async def aclose(self) -> None:
        self.release()
        await self._chunks.aclose()

    def __del__(self) -> None:
        self.release()


async def collect(chunks: AsyncIterator[GenerationChunk]) -> GenerationResult:
    """Drain a stream into one result (engines use it to implement ``generate``)."""
    parts: list[str] = []
    last = GenerationChunk("")
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    return GenerationResult("".join(parts), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens,
                            last.adapter)
