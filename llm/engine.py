"""The one interface every generation engine implements (in-process transformers, remote OpenAI-compatible).

Engines are asynchronous so that the API can stream many requests at once: ``stream`` yields text
deltas as they are decoded; closing the iterator (a client that disconnects) cancels the request and
frees its slot in the running batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
    name: str  # model name reported to clients
    context_window: int  # tokens

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...


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
