"""Retrieval-augmented chat: permitted context -> fenced prompt -> engine stream -> sources and storage."""

from __future__ import annotations

import re
import time
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi.concurrency import run_in_threadpool

from app import metrics
from app.conversations import ConversationStore, new_id
from llm.engine import ChatMessage, Engine, EngineBusy, GenerationChunk, GenerationRequest
from llm.prompt import ContextBlock, PromptBuilder
from retrieval.retriever import Retriever
from security.pii import PiiRedactor
from security.principal import Principal

_CITATION = re.compile(r"\[(\d{1,2})\]")


@dataclass
class ChatInput:
    messages: list[ChatMessage]
    knowledge_base: str
    rag: bool = True
    top_k: int = 5
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    user: str | None = None
    conversation_id: str | None = None


@dataclass
class PreparedChat:
    completion_id: str
    created: int
    request: GenerationRequest
    sources: list[dict]
    question: str
    started: float = 0.0  # perf_counter when the request reached the service (time to first token)


class ChatService:
    def __init__(self, retriever: Retriever, engine: Engine, conversations: ConversationStore, snippet_chars: int = 300,
                 answer_redactor: PiiRedactor | None = None):
        self.retriever = retriever
        self.engine = engine
        self.conversations = conversations
        self.snippet_chars = snippet_chars
        self.answer_redactor = answer_redactor  # generation.redact_answers

    async def prepare(self, chat: ChatInput, reader: Principal) -> PreparedChat:
        """Retrieve what the reader may see and build the prompt (raises PromptTooLong when it can't fit)."""
        started = time.perf_counter()
        question = chat.messages[-1].content
        history = chat.messages[:-1]
        blocks: list[ContextBlock] = []
        if chat.rag:
            hits = await run_in_threadpool(self.retriever.search, question, chat.knowledge_base, reader, chat.top_k)
            blocks = [ContextBlock(h.chunk_id, h.source, h.title, h.page, h.text) for h in hits]
            builder = PromptBuilder(self.engine.count_prompt_tokens, self.engine.context_window,
                                    min(chat.max_tokens, self.engine.context_window // 2))
            built = builder.build(question, blocks, history)
            messages, used = built.messages, built.used_contexts
        else:
            messages, used = chat.messages, []
            if self.engine.count_prompt_tokens(messages) + 1 > self.engine.context_window:
                from llm.engine import PromptTooLong

                raise PromptTooLong(f"the conversation does not fit the model's {self.engine.context_window}-token window")
        sources = [
            {"index": i, "chunk_id": b.chunk_id, "source": b.source, "title": b.title, "page": b.page,
             "snippet": b.text[: self.snippet_chars], "text": b.text}
            for i, b in enumerate(used, start=1)
        ]
        request = GenerationRequest(messages=messages, max_new_tokens=chat.max_tokens, temperature=chat.temperature,
                                    top_p=chat.top_p, seed=chat.seed, stop=chat.stop)
        return PreparedChat(new_id("chatcmpl"), int(time.time()), request, sources, question, started)

    def stream(self, prepared: PreparedChat) -> AsyncIterator[GenerationChunk]:
        """The engine's stream, measured: time to first token, time per later token, tokens, outcome.

        The engine is asked now, not at the first iteration: a full queue (``EngineBusy``) is raised
        here, before a streaming response has started, so the client gets a clean 503 instead of a
        200 whose stream breaks off.
        """
        prepared.request.request_id = prepared.completion_id
        try:
            chunks = self.engine.stream(prepared.request)
        except EngineBusy:
            metrics.GENERATION_REQUESTS.labels(self.engine.name, "rejected").inc()
            raise
        return self._measured(prepared, chunks)

    async def _measured(self, prepared: PreparedChat, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        model = self.engine.name
        first = last = None
        outcome = "cancelled"  # unless the stream ends or fails below: the consumer closed it early
        redacting = self.answer_redactor.streaming() if self.answer_redactor is not None else None
        metrics.ENGINE.started()
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    now = time.perf_counter()
                    if chunk.text and first is None:
                        first = now
                        metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - (prepared.started or now))
                    if chunk.finish_reason is not None:
                        last = now
                        outcome = chunk.finish_reason
                        metrics.PROMPT_TOKENS.labels(model).inc(chunk.prompt_tokens)
                        metrics.GENERATED_TOKENS.labels(model).inc(chunk.completion_tokens)
                        if first is not None and chunk.completion_tokens > 1:
                            metrics.INTER_TOKEN_LATENCY.labels(model).observe((last - first) / (chunk.completion_tokens - 1))
                    if redacting is not None:  # text is held back until no PII can still reach into it
                        text = redacting.feed(chunk.text) + (redacting.flush() if chunk.finish_reason else "")
                        chunk = replace(chunk, text=text)
                    yield chunk
        except EngineBusy:
            outcome = "rejected"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            metrics.ENGINE.finished()
            metrics.GENERATION_REQUESTS.labels(model, outcome).inc()

    def record(self, chat: ChatInput, who: Principal, prepared: PreparedChat, answer: str,
               prompt_tokens: int, completion_tokens: int) -> str:
        cited = {int(n) for n in _CITATION.findall(answer)}
        sources = [{**{k: v for k, v in s.items() if k != "text"}, "cited": s["index"] in cited} for s in prepared.sources]
        return self.conversations.record_exchange(
            chat.conversation_id, who.subject, chat.user, chat.knowledge_base if chat.rag else None, prepared.question,
            answer, prepared.completion_id, sources, prompt_tokens, completion_tokens,
        )
