"""POST /v1/chat/completions (OpenAI schema, retrieval-augmented), conversations and feedback."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import KnowledgeBaseName, check_kb_access, container, readable_groups, require
from app.api.audit import AuditTrail, AuditUnavailable, trail
from app.api.errors import AUDIT_UNAVAILABLE, ApiError, error_body
from app.api.schemas import RequestBody
from app.container import Container
from app.services.chat import ChatInput, ChatService
from llm.engine import ChatMessage, EngineBusy, EngineError
from security.principal import Principal

router = APIRouter(tags=["chat"])
# Conversation history and feedback belong to people: a service account (one bot in front of many
# customers, one subject) may only chat and search, so one customer never reads another's history.
people = require("user")

MAX_MESSAGES = 100
MAX_MESSAGE_CHARS = 32_000


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


def _service(c: Container) -> ChatService:
    return c.chat_service


def _chat_input(body: ChatCompletionRequest, cap: int) -> ChatInput:
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must come from the user", "invalid_messages", "messages")
    if not body.messages[-1].content.strip():
        raise ApiError(400, "the last user message is empty", "invalid_messages", "messages")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
        raise ApiError(400, "stop: at most 4 non-empty sequences of up to 64 characters", "invalid_stop", "stop")
    requested = body.max_completion_tokens or body.max_tokens or min(256, cap)
    if requested > cap:
        raise ApiError(400, f"max_tokens may be at most {cap}", "max_tokens_too_large", "max_tokens")
    return ChatInput(
        messages=[ChatMessage(m.role, m.content) for m in body.messages], knowledge_base=body.knowledge_base,
        rag=body.rag, top_k=body.top_k, max_tokens=requested, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed, stop=stops, user=body.user, conversation_id=body.conversation_id,
    )


@router.post("/v1/chat/completions", summary="Chat completion grounded in the knowledge base (OpenAI schema)")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, c: Container = Depends(container),
    who: Principal = Depends(require("user", "service")), audit: AuditTrail = Depends(trail),
):
    body.knowledge_base = body.knowledge_base or c.settings.default_kb
    act = audit.action("chat", query=body.messages[-1].content, generation=True,
                       knowledge_base=body.knowledge_base if body.rag else None)
    try:
        chat = _chat_input(body, c.settings.generation.max_new_tokens)
        if who.knowledge_base is not None and not chat.rag:
            # A pinned key answers from its knowledge base only, never as a general-purpose model.
            raise ApiError(403, "this key is limited to answers from its knowledge base: rag must be true",
                           "forbidden", "rag")
        check_kb_access(who, chat.knowledge_base)
        service = _service(c)
        reader = readable_groups(who, c.settings.ingest.default_groups)
        prepared = await service.prepare(chat, reader)
    except BaseException as exc:
        await act.finish(exc)  # refused or failed requests are recorded too
        raise
    act.update(chunk_ids=[s["chunk_id"] for s in prepared.sources], detail=f"completion {prepared.completion_id}")
    model = c.generation_engine.name  # the model that answers (behind the openai engine: the remote one)
    public_sources = [{k: v for k, v in s.items() if k != "text"} for s in prepared.sources]

    def audited(last) -> None:
        outcome = last.outcome
        act.update(answer="".join(parts), prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                   detail=f"completion {prepared.completion_id}; answer {outcome.mode}"
                          f"{' grounded' if outcome.grounded else ' ungrounded'}")

    if not body.stream:
        async with act:  # the answer leaves only once its record is written
            parts, last = [], None
            async with aclosing(await service.answer(prepared)) as stream:
                async for chunk in stream:
                    parts.append(chunk.text)
                    last = chunk
            answer = "".join(parts)
            audited(last)
            conversation = await run_in_threadpool(
                service.record, chat, who, prepared, answer, last.prompt_tokens, last.completion_tokens, last.outcome)
        return {
            "id": prepared.completion_id, "object": "chat.completion", "created": prepared.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last.prompt_tokens, last.completion_tokens),
            "sources": last.outcome.sources, "answer_mode": last.outcome.mode, "grounded": last.outcome.grounded,
            "conversation_id": conversation, "adapter": last.adapter,
        }

    def event(delta: dict, finish: str | None = None, **extra) -> str:
        payload = {"id": prepared.completion_id, "object": "chat.completion.chunk", "created": prepared.created,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    # Streamed: the "started" record (question, retrieved chunk ids) is written before the first
    # byte, so a failing audit log fails the request with a plain 503; the outcome record (answer
    # sha256, tokens, answer mode) follows when the stream ends, and if it cannot be written the
    # stream ends with an audit_unavailable error event instead of [DONE]. The first event carries
    # the sources as retrieved; the last one carries them again with their quotes, and the answer
    # mode and grounding.
    # The engine queues the request here: a busy engine answers 503 + Retry-After now, before the
    # stream starts, and a stream that starts holds its place until it ends.
    try:
        chunks = await service.answer(prepared)
    except BaseException as exc:
        await act.finish(exc)  # refused (busy) requests are recorded too
        raise
    parts: list[str] = []
    last = None

    def abandon() -> None:
        """The stream ended early or never started (the client went away): give the engine's place
        back and record what was sent (no awaiting: this may run while cancelled)."""
        chunks.release()
        if not act.done:
            try:
                act.finish_sync("cancelled", answer="".join(parts),
                                completion_tokens=last.completion_tokens if last else None)
            except AuditUnavailable:
                pass  # counted; there is nobody left to tell

    try:
        await act.start()
    except BaseException:
        chunks.release()
        raise

    async def events():
        nonlocal last
        try:
            yield event({"role": "assistant", "content": ""}, sources=public_sources)
            try:
                # A client that disconnects closes this generator, and aclosing closes the engine's
                # stream at once, which frees the request's slot in the running batch.
                async with aclosing(chunks) as stream:
                    async for chunk in stream:
                        parts.append(chunk.text)
                        last = chunk
                        if chunk.text:
                            yield event({"content": chunk.text})
            except EngineBusy as exc:  # a remote engine (openai) learns that it is busy only once asked
                await act.finish(exc)
                yield f"data: {json.dumps(error_body(503, str(exc), 'server_busy'))}\n\n"
                return
            except EngineError as exc:
                await act.finish(exc)
                yield f"data: {json.dumps(error_body(502, f'generation failed: {exc}', 'engine_error'))}\n\n"
                return
            answer = "".join(parts)
            audited(last)
            conversation = await run_in_threadpool(
                service.record, chat, who, prepared, answer, last.prompt_tokens, last.completion_tokens, last.outcome)
            await act.finish()
            yield event({}, last.finish_reason, usage=_usage(last.prompt_tokens, last.completion_tokens),
                        sources=last.outcome.sources, answer_mode=last.outcome.mode, grounded=last.outcome.grounded,
                        conversation_id=conversation, adapter=last.adapter)
            yield "data: [DONE]\n\n"
        except AuditUnavailable:
            yield f"data: {json.dumps(error_body(503, AUDIT_UNAVAILABLE, 'audit_unavailable'))}\n\n"
        finally:
            abandon()

    return _AnswerStream(events(), abandon, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _AnswerStream(StreamingResponse):
    """A streamed answer that always gives its engine place back: a client that leaves before the
    first byte means the generator never started, so its own ``finally`` never runs."""

    def __init__(self, content, on_end, **kwargs):
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.get("/v1/conversations", summary="Your conversations, newest first (administrators: everyone's)")
async def conversations(c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    rows = await run_in_threadpool(c.conversations.list, None if who.is_admin else who.subject)
    return {"data": [{"id": r.id, "title": r.title, "knowledge_base": r.knowledge_base,
                      "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()} for r in rows]}


@router.get("/v1/conversations/{conversation_id}", summary="One conversation with its messages and cited sources")
async def conversation(conversation_id: str, c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    turns = await run_in_threadpool(c.conversations.turns, conversation_id, None if who.is_admin else who.subject)
    if turns is None:
        raise ApiError(404, "no such conversation", "conversation_not_found", "conversation_id")
    # The reader's access is checked again now: a source whose groups were narrowed since is withheld.
    reader = readable_groups(who, c.settings.ingest.default_groups)
    sources = await run_in_threadpool(_service(c).shown_sources, [t.sources for t in turns], reader)
    return {"id": conversation_id, "messages": [
        {"role": t.role, "content": t.content, "completion_id": t.completion_id, "sources": shown,
         "created_at": t.created_at.isoformat()} for t, shown in zip(turns, sources)]}


class FeedbackRequest(RequestBody):
    completion_id: str = Field(..., min_length=1, max_length=64)
    rating: Literal[1, -1]
    correction: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


@router.post("/v1/feedback", summary="Rate an answer (and optionally correct it) for fine-tuning")
async def feedback(body: FeedbackRequest, c: Container = Depends(container), who: Principal = Depends(people)) -> dict:
    owner = await run_in_threadpool(c.conversations.completion_owner, body.completion_id)
    if owner is None or (owner != who.subject and not who.is_admin):
        raise ApiError(404, "no such completion", "completion_not_found", "completion_id")
    feedback_id = await run_in_threadpool(c.conversations.add_feedback, body.completion_id, who.subject, body.rating,
                                          body.correction)
    return {"id": feedback_id, "status": "recorded"}
