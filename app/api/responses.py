"""Response models of every route: OpenAI-compatible shapes for chat, models and embeddings,
Enclave's own for the rest. They make the OpenAPI schema describe what each route answers, and the
schemathesis run (tests/test_api.py) check real responses against it. The chat shapes belong to
the chat service, which returns them (app/services/chat_shapes.py); they are re-exported here so
that this module lists every route's answer.

Enclave's additions to the OpenAI shapes (sources, answer_mode, grounded, conversation_id,
adapter) are declared fields; OpenAI clients ignore fields they do not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from app.services.chat_shapes import (  # noqa: F401  (the chat shapes belong to the chat service)
    _Open, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Quote, Source, Span,
    Usage,
)


# --- health ----------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"]


class Readiness(_Open):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]
    unavailable_knowledge_bases: dict[str, str]  # name -> why (index files failing their sha256)


# --- OpenAI: models, embeddings, chat --------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class StoredSource(Source):
    """A source of a stored answer, as its reader may see it now."""

    cited: bool
    withheld: bool


# --- conversations and feedback --------------------------------------------------------------------
class ConversationSummary(BaseModel):
    id: str
    title: str | None
    knowledge_base: str | None
    created_at: str
    updated_at: str


class ConversationList(BaseModel):
    data: list[ConversationSummary]


class StoredMessage(BaseModel):
    role: str
    content: str
    completion_id: str | None
    sources: list[StoredSource]
    created_at: str


class Conversation(BaseModel):
    id: str
    messages: list[StoredMessage]


class FeedbackRecorded(BaseModel):
    id: int
    status: Literal["recorded"]


# --- knowledge bases and documents -----------------------------------------------------------------
class KnowledgeBaseInfo(BaseModel):
    name: str
    documents: int | None = None  # administrators only
    chunks: int | None = None
    index_version: int | None = None


class KnowledgeBaseList(BaseModel):
    data: list[KnowledgeBaseInfo]


class KnowledgeBaseCreated(BaseModel):
    name: str


class Deleted(BaseModel):
    name: str | None = None
    id: int | None = None
    deleted: bool


class DocumentInfo(BaseModel):
    id: int
    source: str
    title: str | None
    file_type: str
    groups: list[str]
    chunks: int
    size: int | None
    ingested_at: str | None


class DocumentList(BaseModel):
    data: list[DocumentInfo]


class DocumentUploaded(_Open):
    id: int
    source: str
    chunks: int
    groups: list[str]
    added: int
    updated: int


class IngestRun(_Open):
    id: int
    kb: str
    root: str
    started_at: str
    finished_at: str
    status: str
    report: dict[str, Any] | None


class IngestRunList(BaseModel):
    data: list[IngestRun]


# --- keys and audit --------------------------------------------------------------------------------
class KeyInfo(BaseModel):
    id: str
    name: str
    role: str
    groups: list[str]
    knowledge_base: str | None
    active: bool
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class KeyCreated(KeyInfo):
    key: str  # shown once, never stored


class KeyList(BaseModel):
    data: list[KeyInfo]


class AuditStatus(_Open):
    verified: bool
    records: int
    last_seq: int | None
    first_broken_seq: int | None
    problems: list[Any]
    checkpoints: int
    last_checkpoint_seq: int | None
    last_checkpoint_time: str | None
    checkpoint_every: int
    signing_key_id: str | None
    head_hash: str | None
