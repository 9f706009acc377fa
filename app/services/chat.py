"""Retrieval-augmented chat: permitted context -> evidence -> prompt -> checked answer -> sources and storage.

The answer a user sees is made in one of three ways (``answer_mode``), chosen by the policy
(``answer.policy``) and by what the retrieved context holds:

- ``generated``: the model's answer. Under the ``verify`` policy it streams sentence by sentence,
  each one sent only once the support check (``llm/grounding.py``) has found its figures, names
  and most of its words in the blocks it cites; a sentence without a citation gets the block that
  supports it. The first unsupported (or repeated) sentence ends the generation there, and so does
  a first sentence without the figure or name the question asks for ("how many ...?").
- ``extractive``: no supported sentence came (or the policy is ``extractive``): the best-supported
  sentences of the retrieved passages, quoted with their [n].
- ``abstained``: no permitted passage bears on the question (or none was found): the answer says
  so and nothing is generated.

Every source carries ``quote``: the sentence(s) of its chunk that support the answer (or, for a
source the answer does not cite, the chunk's sentence that best matches the question), with
character offsets into the chunk, so that the chat page can highlight them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import numpy as np
from fastapi.concurrency import run_in_threadpool

from app import metrics
from app.conversations import ConversationStore, new_id
from app.services.access import AccessDenied, check_kb_access, readable_groups
from app.services.audit import Actor, AuditService, AuditUnavailable
from app.services.chat_shapes import (
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta, Usage,
)
from app.services.operations import AsyncOperation, Later, resolved
from llm.engine import (
    ChatMessage, Engine, EngineBusy, EngineError, GenerationChunk, GenerationRequest, HeldStream, PromptTooLong,
)
from llm.evidence import (
    Evidence, PromptProfile, answer_type, compress, has_type, missing_names, score_sentences, split_sentences,
)
from llm.grounding import (
    CITATION, CITATION_RUN, NO_ANSWER, NO_CONTEXT, AnswerCheck, Quote, add_citation, best_block, check_answer,
    check_sentence, extractive_answer, find_loop, sentence_key, supporting_quotes,
)
from llm.prompt import (
    DEFAULT_SYSTEM_PROMPT, ONE_SHOT_EXAMPLE, ContextBlock, PromptBuilder, detect_language, estimate_text_tokens,
)
from retrieval.retriever import Retriever
from security.pii import PiiRedactor
from security.principal import Principal

Embed = Callable[[list[str]], np.ndarray]
# Under the generate policy (and for chat without retrieval) text is held back this many characters,
# so that a short unit repeated ("1. 1. 1. 1.", "aaaa") is cut before it reaches the client; a longer
# unit may show twice before the guard ends the generation. Under verify a sentence said again ends
# the answer before it is sent.
_LOOP_HOLDBACK = 32


@dataclass
class ChatInput:
    messages: list[ChatMessage]
    knowledge_base: str | None = None  # None: the server's default_kb (complete)
    rag: bool = True
    top_k: int = 5
    max_tokens: int | None = 256  # None: the server's default (complete)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    user: str | None = None
    conversation_id: str | None = None


@dataclass
class AnswerOptions:
    """The ``answer`` settings, resolved against the model's prompt profile."""

    policy: str = "verify"  # generate | verify | extractive
    profile: PromptProfile = field(default_factory=PromptProfile)
    loop_guard: bool = True
    min_relevance: float = 0.3
    min_relevance_zh: float = 0.12
    min_overlap: float = 0.5
    unknown_names: bool = True  # a name in the question that no passage mentions means "I don't know"
    dense_weight: float = 0.5  # English questions (the bundled embedder)
    dense_weight_zh: float = 0.0  # mostly-Chinese questions: the bundled MiniLM knows no Chinese


@dataclass
class PreparedChat:
    completion_id: str
    created: int
    request: GenerationRequest | None  # None: nothing to generate (extractive answer or abstention)
    sources: list[dict]
    question: str
    started: float = 0.0  # perf_counter when the request reached the service (time to first token)
    plan: str = "generate"  # generate | verify | extract | abstain | plain (rag off)
    language: str | None = None
    contexts: list[str] = field(default_factory=list)  # full chunk text of source n at [n - 1]
    evidence: Evidence | None = None
    relevance: float = 0.0
    missing: list[str] = field(default_factory=list)  # names in the question that no passage mentions
    prompt_tokens: int = 0
    stopped_by_guard: bool = False  # the loop guard or the verify check ended the generation
    wanted: str | None = None  # "number" / "name": what the question asks for (llm.evidence.answer_type)


@dataclass
class AnswerOutcome:
    mode: str  # generated | extractive | abstained
    grounded: bool
    sources: list[dict]  # public sources, with quote
    looped: bool = False
    unsupported: int = 0  # sentences generated but withheld or flagged as unsupported
    check: AnswerCheck | None = None


@dataclass
class AnswerChunk:
    """A piece of the answer; the last one has ``finish_reason`` and ``outcome`` set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    adapter: str | None = None
    outcome: AnswerOutcome | None = None


class ChatRefused(ValueError):
    """A chat request that cannot be answered as asked; it carries its HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.http_status, self.error_code, self.param = status, code, param


MAX_STOPS, MAX_STOP_CHARS = 4, 64


@dataclass
class StreamFailure:
    """A streamed answer that broke off after it started (busy or failing engine, audit log down):
    the API ends the stream with this error as an event instead of ``[DONE]``."""

    error: BaseException


class AnswerEvents:
    """A streamed answer: :class:`ChatCompletionChunk` items, the first with the sources as retrieved,
    the last with the outcome; a :class:`StreamFailure` may end it instead. It holds the request's
    place in the engine and its open audit record: ``abandon()`` (idempotent, no awaiting) gives the
    place back and records what was sent, for a client that left early or never started reading."""

    def __init__(self, items: AsyncIterator[ChatCompletionChunk | StreamFailure], abandon: Callable[[], None]):
        self._items = items
        self.abandon = abandon

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk | StreamFailure]:
        return self._items

    async def aclose(self) -> None:
        await self._items.aclose()


class ChatService:
    def __init__(self, retriever: Retriever | Later[Retriever], engine: Engine | Later[Engine],
                 conversations: ConversationStore, snippet_chars: int = 300,
                 answer_redactor: PiiRedactor | None = None, options: AnswerOptions | None = None,
                 embed: Embed | None = None, *, audit: AuditService | None = None, default_kb: str = "default",
                 default_groups: list[str] | None = None, max_new_tokens: int = 512):
        self._retriever = retriever
        self._engine = engine
        self.conversations = conversations
        self.snippet_chars = snippet_chars
        self.answer_redactor = answer_redactor  # generation.redact_answers
        self.options = options or AnswerOptions()
        self.embed = embed  # scores evidence sentences (None: lexical scores only)
        self.audit = audit  # complete() records every request; prepare()/answer() alone record nothing
        self.default_kb = default_kb
        self.default_groups = list(default_groups or [])
        self.max_new_tokens = max_new_tokens  # generation.max_new_tokens: the most a request may ask for

    @property
    def retriever(self) -> Retriever:
        return resolved(self._retriever)

    @property
    def engine(self) -> Engine:
        return resolved(self._engine)

    # --- one request, start to finish (the API's /v1/chat/completions) ---------------------------

    async def complete(self, chat: ChatInput, who: Principal, actor: Actor, *,
                       stream: bool = False) -> ChatCompletion | AnswerEvents:
        """Check, retrieve, answer, store and audit one chat request.

        Not streamed: one audit record once the answer is complete, before it is returned. Streamed:
        the engine is asked first (a busy one raises ``EngineBusy`` now, before any byte), then the
        ``started`` record (question, retrieved chunk ids) is written, so a failing audit log fails
        the request before the stream starts; the outcome record (answer sha256, tokens, answer mode)
        follows when the stream ends, and if it cannot be written the stream ends with a
        :class:`StreamFailure` instead of its last chunk. Refused and failed requests are recorded too.
        """
        chat = replace(chat, knowledge_base=chat.knowledge_base or self.default_kb)
        op = AsyncOperation(self.audit, actor, "chat", query=chat.messages[-1].content, generation=True,
                            knowledge_base=chat.knowledge_base if chat.rag else None)
        try:
            chat = self._checked(chat, who)
            prepared = await self.prepare(chat, readable_groups(who, self.default_groups))
        except BaseException as exc:
            await op.finish(exc)
            raise
        op.update(chunk_ids=[s["chunk_id"] for s in prepared.sources], detail=f"completion {prepared.completion_id}")
        if not stream:
            return await self._whole(chat, who, prepared, op)
        return await self._streamed(chat, who, prepared, op)

    def _checked(self, chat: ChatInput, who: Principal) -> ChatInput:
        last = chat.messages[-1] if chat.messages else None
        if last is None or last.role != "user":
            raise ChatRefused(400, "invalid_messages", "the last message must come from the user", "messages")
        if not last.content.strip():
            raise ChatRefused(400, "invalid_messages", "the last user message is empty", "messages")
        if len(chat.stop) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in chat.stop):
            raise ChatRefused(400, "invalid_stop",
                              f"stop: at most {MAX_STOPS} non-empty sequences of up to {MAX_STOP_CHARS} characters", "stop")
        cap = self.max_new_tokens
        if chat.max_tokens is not None and chat.max_tokens > cap:
            raise ChatRefused(400, "max_tokens_too_large", f"max_tokens may be at most {cap}", "max_tokens")
        if who.knowledge_base is not None and not chat.rag:
            # A pinned key answers from its knowledge base only, never as a general-purpose model.
            raise AccessDenied("this key is limited to answers from its knowledge base: rag must be true", "rag")
        check_kb_access(who, chat.knowledge_base)
        return replace(chat, max_tokens=chat.max_tokens or min(256, cap))

    def _audit_answer(self, op: AsyncOperation, prepared: PreparedChat, answer: str, last: AnswerChunk) -> None:
        outcome = last.outcome
        op.update(answer=answer, prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                  detail=f"completion {prepared.completion_id}; answer {outcome.mode}"
                         f"{' grounded' if outcome.grounded else ' ungrounded'}")

    async def _whole(self, chat: ChatInput, who: Principal, prepared: PreparedChat,
                     op: AsyncOperation) -> ChatCompletion:
        async with op:  # the answer leaves only once its record is written
            parts, last = [], None
            async with aclosing(await self.answer(prepared)) as chunks:
                async for chunk in chunks:
                    parts.append(chunk.text)
                    last = chunk
            answer = "".join(parts)
            self._audit_answer(op, prepared, answer, last)
            conversation = await run_in_threadpool(
                self.record, chat, who, prepared, answer, last.prompt_tokens, last.completion_tokens, last.outcome)
        return ChatCompletion(
            id=prepared.completion_id, created=prepared.created, model=self.engine.name,
            choices=[ChatChoice(index=0, message=AssistantMessage(role="assistant", content=answer),
                                finish_reason=last.finish_reason)],
            usage=_usage(last), sources=last.outcome.sources, answer_mode=last.outcome.mode,
            grounded=last.outcome.grounded, conversation_id=conversation, adapter=last.adapter)

    async def _streamed(self, chat: ChatInput, who: Principal, prepared: PreparedChat,
                        op: AsyncOperation) -> AnswerEvents:
        try:
            chunks = await self.answer(prepared)  # queued now: a busy engine is a 503 before any byte
        except BaseException as exc:
            await op.finish(exc)  # refused (busy) requests are recorded too
            raise
        try:
            await op.start()
        except BaseException:
            chunks.release()
            raise
        parts: list[str] = []
        last: AnswerChunk | None = None
        model = self.engine.name

        def event(delta: dict, finish: str | None = None, **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=prepared.completion_id, object="chat.completion.chunk",
                                       created=prepared.created, model=model,
                                       choices=[ChunkChoice(index=0, delta=ChunkDelta(**delta), finish_reason=finish)],
                                       **extra)

        def abandon() -> None:
            chunks.release()
            if not op.done:
                try:
                    op.finish_sync("cancelled", answer="".join(parts),
                                   completion_tokens=last.completion_tokens if last else None)
                except AuditUnavailable:
                    pass  # counted; there is nobody left to tell

        async def items() -> AsyncIterator[ChatCompletionChunk | StreamFailure]:
            nonlocal last
            try:
                yield event({"role": "assistant", "content": ""},
                            sources=[{k: v for k, v in s.items() if k != "text"} for s in prepared.sources])
                try:
                    # A client that disconnects closes this generator, and aclosing closes the
                    # engine's stream at once, which frees the request's slot in the running batch.
                    async with aclosing(chunks) as answer:
                        async for chunk in answer:
                            parts.append(chunk.text)
                            last = chunk
                            if chunk.text:
                                yield event({"content": chunk.text})
                except EngineError as exc:  # a remote engine may still fail once it has started
                    await op.finish(exc)
                    yield StreamFailure(exc)
                    return
                answer_text = "".join(parts)
                self._audit_answer(op, prepared, answer_text, last)
                conversation = await run_in_threadpool(self.record, chat, who, prepared, answer_text,
                                                       last.prompt_tokens, last.completion_tokens, last.outcome)
                await op.finish()
                yield event({}, last.finish_reason, usage=_usage(last), sources=last.outcome.sources,
                            answer_mode=last.outcome.mode, grounded=last.outcome.grounded,
                            conversation_id=conversation, adapter=last.adapter)
            except AuditUnavailable as exc:
                yield StreamFailure(exc)
            finally:
                abandon()

        return AnswerEvents(items(), abandon)

    # --- preparation ------------------------------------------------------------------------------

    async def prepare(self, chat: ChatInput, reader: Principal, policy: str | None = None) -> PreparedChat:
        """Retrieve what the reader may see, weigh its sentences, and build the prompt when one is
        needed (raises PromptTooLong when it can't fit). ``policy`` overrides ``answer.policy``."""
        started = time.perf_counter()
        question = chat.messages[-1].content
        history = chat.messages[:-1]
        language = detect_language(question)
        options = self.options
        policy = policy or options.policy
        if not chat.rag:
            if self.engine.count_prompt_tokens(chat.messages) + 1 > self.engine.context_window:
                raise PromptTooLong(f"the conversation does not fit the model's {self.engine.context_window}-token window")
            request = self._request(chat, chat.messages)
            return PreparedChat(new_id("chatcmpl"), int(time.time()), request, [], question, started, "plain", language)

        hits = await run_in_threadpool(self.retriever.search, question, chat.knowledge_base, reader, chat.top_k)
        contexts = [h.text for h in hits]
        sources = [
            {"index": i, "chunk_id": h.chunk_id, "source": h.source, "title": h.title, "page": h.page,
             "heading": h.heading,  # heading path within the document: "Section > Subsection"
             "snippet": h.text[: self.snippet_chars], "text": h.text}
            for i, h in enumerate(hits, start=1)
        ]
        prepared = PreparedChat(new_id("chatcmpl"), int(time.time()), None, sources, question, started,
                                "abstain", language, contexts)
        if not hits:
            return prepared
        zh = language == "zh"
        dense_weight = options.dense_weight_zh if zh else options.dense_weight
        evidence = await run_in_threadpool(score_sentences, question, contexts, [h.title for h in hits],
                                           self.embed, dense_weight)
        prepared.evidence = evidence
        prepared.relevance = evidence.relevance
        prepared.wanted = answer_type(question)
        prepared.missing = missing_names(question, contexts + [f"{h.title or ''} {h.source}" for h in hits])
        if (evidence.relevance < (options.min_relevance_zh if zh else options.min_relevance)
                or (options.unknown_names and prepared.missing)):
            return prepared  # nothing here bears on the question (or on what it names): say so, generate nothing
        if policy == "extractive":
            prepared.plan = "extract"
            return prepared

        profile = options.profile
        blocks = [ContextBlock(hits[c.block].chunk_id, hits[c.block].source, hits[c.block].title, hits[c.block].page,
                               c.text, number=c.block + 1) for c in compress(contexts, evidence, profile)]
        system = DEFAULT_SYSTEM_PROMPT + ONE_SHOT_EXAMPLE if profile.one_shot and profile.style == "fenced" else None
        builder = PromptBuilder(self.engine.count_prompt_tokens, self.engine.context_window,
                                min(chat.max_tokens, self.engine.context_window // 2), system_prompt=system,
                                style=profile.style)
        built = builder.build(question, blocks, history)
        prepared.request = self._request(chat, built.messages)
        prepared.prompt_tokens = built.prompt_tokens
        prepared.plan = "verify" if policy == "verify" else "generate"
        return prepared

    def _request(self, chat: ChatInput, messages: list[ChatMessage]) -> GenerationRequest:
        profile = self.options.profile
        return GenerationRequest(messages=messages, max_new_tokens=chat.max_tokens, temperature=chat.temperature,
                                 top_p=chat.top_p, seed=chat.seed, stop=chat.stop,
                                 repetition_penalty=profile.repetition_penalty, no_repeat_ngram=profile.no_repeat_ngram)

    # --- answering --------------------------------------------------------------------------------

    async def answer(self, prepared: PreparedChat) -> HeldStream:
        """The answer as a stream of :class:`AnswerChunk` (the last one carries the outcome).

        The engine is asked now, not at the first iteration (``Engine.open``, llm/engine.py): the
        in-process engine queues the request, the openai engine waits for the server to accept it,
        so a full queue or a busy/failing server raises ``EngineBusy`` / ``EngineError`` before a
        streaming response has started (a clean 503/502 instead of a 200 whose stream breaks off).
        The returned stream holds that place: close it (``aclose``) or call ``release()`` if it will
        not be read.
        """
        if prepared.request is None:
            return HeldStream(self._without_model(prepared), lambda: None)
        prepared.request.request_id = prepared.completion_id
        try:
            chunks = await self.engine.open(prepared.request)
        except EngineBusy:
            metrics.GENERATION_REQUESTS.labels(self.engine.name, "rejected").inc()
            raise
        # Closing (or dropping) the answer before it was read gives the engine's place back.
        return HeldStream(self._generated(prepared, self._measured(prepared, chunks)), chunks.release)

    async def _without_model(self, prepared: PreparedChat) -> AsyncIterator[AnswerChunk]:
        text, outcome = self._fallback(prepared)
        yield AnswerChunk(text, "stop", 0, 0, None, outcome)

    def _fallback(self, prepared: PreparedChat, unsupported: int = 0, looped: bool = False) -> tuple[str, AnswerOutcome]:
        """The extractive answer, or "I don't know" when nothing relevant was found."""
        lang = "zh" if prepared.language == "zh" else "en"
        if prepared.plan == "abstain" or prepared.evidence is None:
            text = NO_CONTEXT[lang] if not prepared.sources else NO_ANSWER[lang]
            outcome = AnswerOutcome("abstained", True, self._public_sources(prepared, []), looped, unsupported)
        else:
            text, quotes = extractive_answer(prepared.evidence, prepared.language, texts=prepared.contexts)
            outcome = AnswerOutcome("extractive" if quotes else "abstained", True,
                                    self._public_sources(prepared, quotes), looped, unsupported)
        if self.answer_redactor is not None:
            text = self.answer_redactor.redact(text)
        self._count(outcome)
        return text, outcome

    async def _generated(self, prepared: PreparedChat, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[AnswerChunk]:
        verify = prepared.plan == "verify"
        rag = prepared.plan != "plain"
        raw = ""  # everything generated (after the loop guard's cut)
        sent = ""  # what the client has received
        consumed = 0  # characters of raw already judged (verify) or sent (generate)
        last: GenerationChunk | None = None
        looped = failed = False
        unsupported = 0
        async with aclosing(chunks):
            async for chunk in chunks:
                last = chunk
                raw += chunk.text
                if self.options.loop_guard:
                    cut = find_loop(raw)
                    if cut is not None:
                        raw, looped = raw[:cut], True
                        metrics.GENERATION_LOOPS.labels(self.engine.name).inc()
                done = chunk.finish_reason is not None or looped
                if verify:
                    piece, consumed, failed = self._verified(prepared, raw, consumed, done and chunk.finish_reason != "length")
                    unsupported += failed
                else:
                    end = len(raw) if done else max(consumed, len(raw) - (_LOOP_HOLDBACK if self.options.loop_guard else 0))
                    piece, consumed = raw[consumed:end], end
                if piece:
                    sent += piece
                    yield AnswerChunk(piece)
                if done or failed:
                    # Leaving the loop closes the engine's stream: the request leaves the batch.
                    prepared.stopped_by_guard = chunk.finish_reason is None
                    break
        finished = last is not None and last.finish_reason is not None
        prompt_tokens = (last.prompt_tokens if last is not None else 0) or prepared.prompt_tokens
        completion_tokens = (last.completion_tokens if last is not None else 0) or estimate_text_tokens(raw)
        adapter = last.adapter if last is not None else None
        if verify and not sent.strip():
            text, outcome = self._fallback(prepared, unsupported, looped)
            yield AnswerChunk(text, "stop", prompt_tokens, completion_tokens, adapter, outcome)
            return
        if rag:
            check = check_answer(sent, prepared.contexts, self.options.min_overlap)
            quotes = supporting_quotes(check, prepared.contexts)
            grounded = check.grounded
            unsupported += 0 if verify else len(check.unsupported)
        else:
            check, quotes, grounded = None, [], False
        outcome = AnswerOutcome("generated", grounded, self._public_sources(prepared, quotes), looped, unsupported, check)
        self._count(outcome)
        reason = "stop" if (looped or failed or not finished or last.finish_reason == "cancelled") else last.finish_reason
        yield AnswerChunk("", reason, prompt_tokens, completion_tokens, adapter, outcome)

    def _verified(self, prepared: PreparedChat, raw: str, consumed: int, complete: bool) -> tuple[str, int, bool]:
        """Judge the sentences of ``raw`` past ``consumed`` that are finished (all of them when the
        answer is ``complete``). Returns (text to send, new consumed, whether one was unsupported or
        repeated: the answer ends there)."""
        seen = {sentence_key(s.text) for s in split_sentences(raw[:consumed])}
        consumed_any = bool(seen)
        spans = split_sentences(raw)
        if not complete:
            spans = spans[:-1]  # the last sentence may still grow
        out = []
        for span in spans:
            if span.end <= consumed:
                continue
            tail = CITATION_RUN.match(raw, span.end)
            end = tail.end() if tail else span.end
            if not complete and end == len(raw):
                break  # a citation may still follow
            sentence = raw[span.start:end]
            if CITATION_RUN.fullmatch(" " + sentence):
                consumed = end
                continue
            key = sentence_key(sentence)
            if key in seen:
                return "".join(out), consumed, True  # said again: the model is looping; end here
            seen.add(key)
            check = check_sentence(sentence, prepared.contexts, (), self.options.min_overlap)
            if check.abstention or not check.supported:
                return "".join(out), consumed, True
            if not consumed_any and prepared.wanted and not has_type(CITATION.sub("", sentence), prepared.wanted):
                return "".join(out), consumed, True  # asked for a figure or a name, the answer opens without one
            consumed_any = True
            if not check.cited:
                sentence = add_citation(sentence, best_block(sentence, prepared.contexts))
            out.append((raw[consumed:span.start] if consumed else "") + sentence)
            consumed = end
        return "".join(out), consumed, False

    async def _measured(self, prepared: PreparedChat, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        """The engine's stream, measured: time to first token, time per later token, tokens, outcome."""
        model = self.engine.name
        first = last = None
        outcome = "cancelled"  # unless the stream ends or fails below: the consumer closed it early
        seen: GenerationChunk | None = None  # the latest chunk (running token counts)
        redacting = self.answer_redactor.streaming() if self.answer_redactor is not None else None
        metrics.ENGINE.started()
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    seen = chunk
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
            if outcome == "cancelled" and prepared.stopped_by_guard:
                # Ended on purpose (a loop, an unsupported sentence): a stop, with the tokens spent.
                outcome = "stop"
                if seen is not None:
                    metrics.PROMPT_TOKENS.labels(model).inc(seen.prompt_tokens)
                    metrics.GENERATED_TOKENS.labels(model).inc(seen.completion_tokens)
                    if first is not None and seen.completion_tokens > 1:
                        metrics.INTER_TOKEN_LATENCY.labels(model).observe(
                            (time.perf_counter() - first) / (seen.completion_tokens - 1))
            metrics.ENGINE.finished()
            metrics.GENERATION_REQUESTS.labels(model, outcome).inc()

    # --- sources and records ----------------------------------------------------------------------

    def _public_sources(self, prepared: PreparedChat, quotes: list[Quote]) -> list[dict]:
        """Sources as clients see them (no full text), each with its ``quote``."""
        by_block: dict[int, list] = {}
        for q in quotes:
            by_block.setdefault(q.block, []).append(q.span)
        best: dict[int, list] = {}
        if prepared.evidence is not None:
            for block, sentences in prepared.evidence.by_block.items():
                best[block + 1] = [sentences[0].span]
        out = []
        for s in prepared.sources:
            spans = sorted(by_block.get(s["index"]) or best.get(s["index"]) or [], key=lambda sp: sp.start)
            quote = None
            if spans:
                quote = {"text": " … ".join(sp.text for sp in spans),
                         "spans": [{"start": sp.start, "end": sp.end} for sp in spans],
                         "supports_answer": s["index"] in by_block}
            out.append({**{k: v for k, v in s.items() if k != "text"}, "quote": quote})
        return out

    @staticmethod
    def _count(outcome: AnswerOutcome) -> None:
        metrics.ANSWERS.labels(outcome.mode, "true" if outcome.grounded else "false").inc()

    def record(self, chat: ChatInput, who: Principal, prepared: PreparedChat, answer: str,
               prompt_tokens: int, completion_tokens: int, outcome: AnswerOutcome | None = None) -> str:
        cited = {int(n) for n in CITATION.findall(answer)}
        public = outcome.sources if outcome is not None else [
            {k: v for k, v in s.items() if k != "text"} for s in prepared.sources]
        # Stored without any text (no snippet, title or quote): a conversation shows each source as
        # its reader may read it when they look (shown_sources), not as they could when they asked.
        sources = [{"index": s["index"], "chunk_id": s["chunk_id"], "cited": s["index"] in cited,
                    "quote": {"spans": s["quote"]["spans"], "supports_answer": s["quote"]["supports_answer"]}
                    if s.get("quote") else None} for s in public]
        return self.conversations.record_exchange(
            chat.conversation_id, who.subject, chat.user, chat.knowledge_base if chat.rag else None, prepared.question,
            answer, prepared.completion_id, sources, prompt_tokens, completion_tokens,
        )

    def shown_sources(self, stored: list[list[dict]], reader: Principal) -> list[list[dict]]:
        """Stored sources (one list per message) as ``reader`` may see them now: a chunk that still
        exists and that the reader may still read is shown from its current row (source, title,
        snippet, quote); any other is ``withheld``, with nothing of its text, title or path."""
        ids = {s.get("chunk_id") for sources in stored for s in sources}
        readable = self.retriever.readable_chunks(sorted(i for i in ids if isinstance(i, int)), reader)
        return [[self._shown(s, readable.get(s.get("chunk_id"))) for s in sources] for sources in stored]

    def _shown(self, stored: dict, chunk) -> dict:
        shown = {"index": stored.get("index"), "chunk_id": None, "source": None, "title": None, "page": None,
                 "heading": None, "snippet": None, "quote": None, "cited": bool(stored.get("cited")), "withheld": chunk is None}
        if chunk is None:
            return shown
        quote = stored.get("quote") or {}
        spans = [{"start": sp["start"], "end": sp["end"]} for sp in quote.get("spans") or []
                 if isinstance(sp, dict) and 0 <= sp.get("start", -1) < sp.get("end", -1) <= len(chunk.text)]
        return {**shown, "chunk_id": chunk.chunk_id, "source": chunk.source, "title": chunk.title, "page": chunk.page,
                "heading": chunk.heading, "snippet": chunk.text[: self.snippet_chars],
                "quote": {"text": " … ".join(chunk.text[sp["start"]:sp["end"]] for sp in spans), "spans": spans,
                          "supports_answer": bool(quote.get("supports_answer"))} if spans else None}


def _usage(last: AnswerChunk) -> Usage:
    return Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                 total_tokens=last.prompt_tokens + last.completion_tokens)
