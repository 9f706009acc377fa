"""The typed answers of the chat service, in the OpenAI chat-completion shapes.

``ChatService.complete`` returns a :class:`ChatCompletion`, or a stream of :class:`ChatCompletionChunk`
(framed as server-sent events by the API, app/api/sse.py). Enclave's additions to the OpenAI shapes
(sources, answer_mode, grounded, conversation_id, adapter) are declared fields; OpenAI clients
ignore fields they do not know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    """A shape that may grow: unknown fields are kept (clients must ignore what they do not know)."""

    model_config = ConfigDict(extra="allow")


class Span(BaseModel):
    start: int
    end: int


class Quote(BaseModel):
    text: str | None = None
    spans: list[Span]
    supports_answer: bool


class Source(_Open):
    """A cited passage: [index] in the answer refers to it. ``quote``: the sentences that support
    the answer, with offsets into the passage; ``withheld``: a stored source the reader may no
    longer see (its text and title are not shown)."""

    index: int | None
    chunk_id: int | None = None
    source: str | None = None
    title: str | None = None
    page: int | None = None
    heading: str | None = None  # the heading path within the document: "Section > Subsection"
    snippet: str | None = None
    quote: Quote | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source]
    answer_mode: str
    grounded: bool
    conversation_id: str | None = None
    adapter: str | None = None


class ChunkDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None


class ChatCompletionChunk(_Open):
    """One server-sent event of a streamed answer (``data: {...}``): the first carries the sources
    as retrieved, the last one the finish reason, usage, the sources with their quotes, the answer
    mode and grounding."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
