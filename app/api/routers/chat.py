"""POST /v1/chat/completions (OpenAI schema, retrieval-augmented), conversations and feedback."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from app.api.audit import actor
from app.api.deps import KnowledgeBaseName, container, require
from app.api.errors import ApiError
from app.api.responses import ChatCompletion, Conversation, ConversationList, FeedbackRecorded
from app.api.schemas import RequestBody
from app.api.sse import EventStream
from app.container import Container
from app.services.access import readable_groups
from app.services.chat import ChatInput
from llm.engine import ChatMessage
from security.principal import Principal

router = APIRouter(tags=["chat"])
# Conversation history and feedback belong to people: a service account (one bot in front of many
# customers, one subject) may only chat and search, so one customer never reads another's history.
people = require("user")

MAX_MESSAGES = 100
MAX_MESSAGE_CHARS = 32_000
# With "stream": true the answer is server-sent events, each `data: <ChatCompletionChunk>`, then `data: [DONE]`.
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "stream: true: server-sent events of chat.completion.chunk objects"}}


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=MAX_MESSAGE_CHARS)


class ChatCompletionRequest(RequestBody):
    # OpenAI clients send fields Enclave does not use (presence_penalty, logit_bias, ...): accepted, ignored.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessageIn] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(None, max_length=256)
    # Enclave extensions
    # None: the server's `default_kb`, as for the CLI.
    knowledge_base: KnowledgeBaseName | None = None
    rag: bool = True
    top_k: int = Field(5, ge=1, le=20)
    conversation_id: str | None = Field(None, max_length=40)


def _chat_input(body: ChatCompletionRequest) -> ChatInput:
    """The request as the chat service takes it (the service checks it: ChatRefused is a 400)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatInput(
        messages=[ChatMessage(m.role, m.content) for m in body.messages], knowledge_base=body.knowledge_base,
        rag=body.rag, top_k=body.top_k, max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops, user=body.user,
        conversation_id=body.conversation_id,
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAMED,
             summary="Chat completion grounded in the knowledge base (OpenAI schema)")
async def chat_completions(body: ChatCompletionRequest, request: Request, c: Container = Depends(container),
                           who: Principal = Depends(require("user", "service"))):
    answer = await c.chat_service.complete(_chat_input(body), who, actor(request), stream=body.stream)
    return EventStream(answer) if body.stream else answer


@router.get("/v1/conversations", response_model=ConversationList, summary="Your conversations, newest first (administrators: everyone's)")
async def conversations(c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    rows = await run_in_threadpool(c.conversations.list, None if who.is_admin else who.subject)
    return {"data": [{"id": r.id, "title": r.title, "knowledge_base": r.knowledge_base,
                      "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()} for r in rows]}


@router.get("/v1/conversations/{conversation_id}", response_model=Conversation, summary="One conversation with its messages and cited sources")
async def conversation(conversation_id: str, c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    turns = await run_in_threadpool(c.conversations.turns, conversation_id, None if who.is_admin else who.subject)
    if turns is None:
        raise ApiError(404, "no such conversation", "conversation_not_found", "conversation_id")
    # The reader's access is checked again now: a source whose groups were narrowed since is withheld.
    reader = readable_groups(who, c.settings.ingest.default_groups)
    sources = await run_in_threadpool(c.chat_service.shown_sources, [t.sources for t in turns], reader)
    return {"id": conversation_id, "messages": [
        {"role": t.role, "content": t.content, "completion_id": t.completion_id, "sources": shown,
         "created_at": t.created_at.isoformat()} for t, shown in zip(turns, sources)]}


class FeedbackRequest(RequestBody):
    completion_id: str = Field(..., min_length=1, max_length=64)
    rating: Literal[1, -1]
    correction: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


@router.post("/v1/feedback", response_model=FeedbackRecorded, summary="Rate an answer (and optionally correct it) for fine-tuning")
async def feedback(body: FeedbackRequest, c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    owner = await run_in_threadpool(c.conversations.completion_owner, body.completion_id)
    if owner is None or (owner != who.subject and not who.is_admin):
        raise ApiError(404, "no such completion", "completion_not_found", "completion_id")
    feedback_id = await run_in_threadpool(c.conversations.add_feedback, body.completion_id, who.subject, body.rating,
                                          body.correction)
    return {"id": feedback_id, "status": "recorded"}
