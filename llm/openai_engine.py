"""Generation through any OpenAI-compatible server: vLLM (one GPU, tensor/pipeline parallel, multi-node
with Ray), llama.cpp's server, ``transformers serve``.

Behaviour common to every server, whatever it implements:

* Retries: connection failures, HTTP 5xx and 429 are retried (exponential backoff, ``Retry-After``
  honoured up to 30 s) only while nothing has been streamed to the caller; once text went out a
  failure ends the stream with :class:`EngineError`. Read timeouts are not retried: the server is
  up but slow, and asking again would only add load. After the retries, 429/503 become
  :class:`EngineBusy` (the API answers 503 with Retry-After), other failures :class:`EngineError`.
* Timeouts: ``timeout`` bounds connecting and every wait for data, i.e. the wait for the first
  token and between tokens when streaming, and the whole answer for :meth:`generate`.
* Stop strings are sent to the server and also enforced here: servers differ on whether the matched
  stop string is returned (vLLM and OpenAI drop it, ``transformers serve`` keeps it), so text is cut
  before the first stop string; streamed text is held back while it could be the start of one.
* Usage: ``stream_options={"include_usage": true}`` is sent (and dropped for good if the server
  rejects the field); without usage from the server the tokens are counted locally
  (:meth:`count_prompt_tokens`, and the tokenizer or the estimate for the answer).
* Cancellation: closing the iterator (``aclose()``, a cancelled task) closes the HTTP response, which
  servers take as the signal to abort the request and free its batch slot.
* Secrets: error messages and logs name the server without credentials and are scrubbed of the API
  key, even when a server echoes it back; exceptions are raised ``from None`` for the same reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai

from llm.engine import (
    ChatMessage,
    EngineBusy,
    EngineError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    HeldStream,
    PromptTooLong,
)
from llm.prompt import chat_token_counter, estimate_chat_tokens, estimate_text_tokens

log = logging.getLogger(__name__)

_RETRY_STATUSES = {429, 500, 502, 503, 504}
_BUSY_STATUSES = {429, 503}
_MAX_RETRY_AFTER = 30.0  # seconds; a longer Retry-After is capped
# openai 3.x wraps a connection cut while a response body or stream is read in APIConnectionError;
# 2.x lets httpx's own error through. Both are in the supported range (pyproject), so both are caught.
_CLIENT_ERRORS = (openai.OpenAIError, httpx.TransportError)
_CONTEXT_ERRORS = ("context length", "context window", "maximum context", "too many tokens", "prompt is too long")


class OpenAIEngine:
    """The :class:`llm.engine.Engine` protocol over an OpenAI-compatible ``/v1/chat/completions``."""

    adapter_version: str | None = None  # adapters live on the remote server, not here
    supports_adapters = False

    def queue_state(self) -> None:
        """The queue lives on the remote server (vLLM exports its own metrics)."""
        return None

    async def switch_adapter(self, version: str | None, path=None) -> None:
        raise EngineError("the openai engine cannot switch adapters: load them on the model server")

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        context_window: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        max_new_tokens: int | None = None,
        tokenizer: Any | None = None,
        name: str | None = None,
        retry_backoff: float = 0.5,
        http_client: Any | None = None,
    ) -> None:
        """
        base_url: the server's OpenAI root, e.g. ``http://vllm:8000/v1``.
        model: the model name the server serves (vLLM ``--served-model-name``).
        api_key: sent as a bearer token; servers without auth accept any value.
        context_window: tokens; None asks the server at :meth:`start` (vLLM reports ``max_model_len``).
        max_new_tokens: a cap applied to every request's ``max_new_tokens``.
        tokenizer: a transformers tokenizer of the served model (with its chat template) for exact
            counts; without it counts are estimates (see :func:`llm.prompt.estimate_text_tokens`).
        http_client: an ``openai.DefaultAsyncHttpxClient`` for custom TLS (internal CA), proxies or
            instrumentation; the engine closes it in :meth:`close`.
        """
        self.base_url = base_url
        self.model = model
        self.name = name or model
        self.context_window = context_window  # type: ignore[assignment]  # filled by start() when None
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_new_tokens = max_new_tokens
        self.retry_backoff = retry_backoff
        self._api_key = api_key or ""
        # Never shown: the key, and a password written into the URL (http://user:pw@host/v1).
        self._secrets = [x for x in (self._api_key, urlsplit(base_url).password) if x]
        self._tokenizer = tokenizer
        self._count_chat = chat_token_counter(tokenizer) if tokenizer is not None else estimate_chat_tokens
        self._http_client = http_client
        self._client: openai.AsyncOpenAI | None = None
        self._include_usage = True  # turned off if the server rejects stream_options
        self._where = f"model server at {_display_url(base_url)}"

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEngine(base_url={_display_url(self.base_url)!r}, model={self.model!r})"

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the client and check the server. An unreachable server is only a warning (vLLM may
        still be loading; requests retry), unless the context window must come from it."""
        client = self._ensure_client()
        try:
            page = await client.models.list()
        except _CLIENT_ERRORS as exc:
            error = self._engine_error(exc, attempts=1)
            if self.context_window is None:
                raise EngineError(
                    f"{error}; cannot learn the context window from it: configure it explicitly"
                ) from None
            log.warning("%s; requests will retry", error)
            return
        served = {m.id: m for m in page.data}
        if self.model not in served:
            listed = ", ".join(served) or "nothing"
            log.warning("the %s does not list model %r (it serves: %s)", self._where, self.model, listed)
        if self.context_window is None:
            window = getattr(served.get(self.model), "max_model_len", None)  # a vLLM extension
            if not isinstance(window, int):
                raise EngineError(
                    f"the {self._where} does not report the context window of {self.model!r}: configure it explicitly"
                )
            self.context_window = window

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _ensure_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                # A placeholder rather than None, which would make the client read OPENAI_API_KEY.
                api_key=self._api_key or "EMPTY",
                timeout=self.timeout,
                max_retries=0,  # retries are ours: never after text was streamed
                http_client=self._http_client,
            )
        return self._client

    # --- counting ---------------------------------------------------------------------------------

    def count_prompt_tokens(self, messages: list[ChatMessage]) -> int:
        """Exact with a tokenizer (chat template included), else an over-estimate."""
        return self._count_chat(messages)

    def _count_text(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return estimate_text_tokens(text)

    # --- generation -------------------------------------------------------------------------------

    async def open(self, request: GenerationRequest) -> HeldStream:
        """Send the request and wait for the server's answer to it (status and headers), retrying
        what may pass (busy, unreachable, 5xx) before any text: a busy or failing server raises
        EngineBusy / EngineError here, before the caller has promised its client anything. The
        returned stream holds the open upstream response until it is read, closed or released."""
        client = self._ensure_client()
        attempt = 0
        while True:
            response = None
            try:
                response = await client.chat.completions.create(**self._params(request, stream=True))
                # Up to the first text too: a connection cut before it is retried like a refused request.
                events = response.__aiter__()
                first = await _until_text(events)
                break
            except _CLIENT_ERRORS as exc:
                if response is not None:
                    await response.close()
                if self._rejects_stream_options(exc):
                    continue  # asked again without the field: not a failed attempt
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise self._engine_error(exc, attempts=attempt + 1) from None
                attempt += 1
                await asyncio.sleep(delay)
        return HeldStream(self._read(request, response, _chain(first, events), attempt + 1),
                          functools.partial(_close_soon, response))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async with aclosing(await self.open(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        client = self._ensure_client()
        attempt = 0
        while True:
            try:
                response = await client.chat.completions.create(**self._params(request, stream=False))
                break
            except _CLIENT_ERRORS as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise self._engine_error(exc, attempts=attempt + 1) from None
                attempt += 1
                await asyncio.sleep(delay)
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice else None) or ""
        text, stopped = _cut_at_stop(text, request.stop)
        finish = "stop" if stopped else _finish_reason(choice.finish_reason if choice else None)
        usage = None if stopped else response.usage  # a cut answer: the server's count is too high
        return GenerationResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=response.usage.prompt_tokens if response.usage else self.count_prompt_tokens(request.messages),
            completion_tokens=usage.completion_tokens if usage else self._count_text(text),
        )

    async def _read(self, request: GenerationRequest, response, events: AsyncIterator,
                    attempts: int) -> AsyncIterator[GenerationChunk]:
        """The events of an open response; a failure now cuts the answer off (never retried)."""
        parts: list[str] = []
        try:
            scanner = _StopScanner(request.stop)
            finish: FinishReason | None = None
            usage = None
            async for event in events:
                if event.usage is not None:
                    usage = event.usage
                for choice in event.choices[:1]:
                    piece = scanner.feed(choice.delta.content or "") if choice.delta else ""
                    if piece:
                        parts.append(piece)
                        yield GenerationChunk(piece)
                    if scanner.stopped:
                        finish = "stop"
                        break
                    if choice.finish_reason:
                        finish = _finish_reason(choice.finish_reason)
                if scanner.stopped:
                    usage = None  # the server generated past the stop string: count what was kept
                    break  # closing the response below cancels the rest on the server
            tail = scanner.flush()
            if tail:
                parts.append(tail)
                yield GenerationChunk(tail)
            text = "".join(parts)
            yield GenerationChunk(
                "",
                finish_reason=finish or "stop",
                prompt_tokens=usage.prompt_tokens if usage else self.count_prompt_tokens(request.messages),
                completion_tokens=usage.completion_tokens if usage else self._count_text(text),
            )
        except _CLIENT_ERRORS as exc:
            raise self._engine_error(exc, attempts=attempts, cut_off=bool(parts)) from None
        finally:
            await response.close()

    def _params(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        max_tokens = request.max_new_tokens
        if self.max_new_tokens is not None:
            max_tokens = min(max_tokens, self.max_new_tokens)
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": stream,
        }
        if request.seed is not None:
            params["seed"] = request.seed
        if request.stop:
            params["stop"] = list(request.stop)
        if request.repetition_penalty != 1.0:  # vLLM's sampling extension (ignored by servers without it)
            params["extra_body"] = {"repetition_penalty": request.repetition_penalty}
        if stream and self._include_usage:
            params["stream_options"] = {"include_usage": True}
        if request.request_id:
            params["extra_headers"] = {"X-Request-Id": request.request_id}  # vLLM logs it as its request id
        return params

    # --- errors -----------------------------------------------------------------------------------

    def _rejects_stream_options(self, exc: Exception) -> bool:
        """True (once) when the server refused the ``stream_options`` field: stop sending it."""
        if (
            self._include_usage
            and isinstance(exc, openai.APIStatusError)
            and exc.status_code in (400, 422)
            and "stream_options" in _detail(exc)
        ):
            self._include_usage = False  # an older server: token usage is counted locally from now on
            log.info("the %s rejects stream_options; token usage will be counted locally", self._where)
            return True
        return False

    def _retry_delay(self, exc: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when ``exc`` is final."""
        exc = _as_openai_error(exc)
        if attempt >= self.max_retries or isinstance(exc, openai.APITimeoutError):
            return None
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code not in _RETRY_STATUSES:
                return None
            delay = _retry_after(exc)
            reason = f"got HTTP {exc.status_code} from"
        elif isinstance(exc, openai.APIConnectionError):
            delay, reason = None, "could not connect to"
        else:
            return None  # an error event inside a stream: the server failed this request
        if delay is None:
            delay = self.retry_backoff * 2**attempt
        delay = min(delay, _MAX_RETRY_AFTER)
        log.warning("%s the %s; retry %d/%d in %.1f s", reason, self._where, attempt + 1, self.max_retries, delay)
        return delay

    def _engine_error(self, exc: Exception, *, attempts: int, cut_off: bool = False) -> EngineError:
        exc = _as_openai_error(exc)
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, openai.APITimeoutError):
            error: EngineError = EngineError(f"the {self._where} did not answer within {self.timeout:g} s")
        elif isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            reason = str(cause) or type(cause).__name__
            error = EngineError(f"cannot reach the {self._where}{tries}: {reason}")
        elif isinstance(exc, openai.APIStatusError):
            status, detail = exc.status_code, _detail(exc)
            if status in _BUSY_STATUSES:
                error = EngineBusy(f"the {self._where} is busy (HTTP {status}){tries}; try again later")
            elif status in (401, 403):
                error = EngineError(f"the {self._where} refused the API key (HTTP {status}): {detail}")
            elif status == 404:
                error = EngineError(
                    f"the {self._where} has no model {self.model!r} or no chat endpoint (HTTP 404): {detail}"
                )
            elif status in (400, 413, 422) and any(s in detail.lower() for s in _CONTEXT_ERRORS):
                error = PromptTooLong(f"the prompt does not fit the context window of {self.model!r}: {detail}")
            else:
                error = EngineError(f"the {self._where} failed the request (HTTP {status}){tries}: {detail}")
        else:
            error = EngineError(f"the {self._where} failed while generating: {_detail(exc)}")
        if cut_off:
            error = type(error)(f"{error.args[0]} (the answer was cut off after it had started streaming)")
        return type(error)(self._redact(error.args[0]))

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


# --- helpers --------------------------------------------------------------------------------------


class _StopScanner:
    """Cuts streamed text before the first stop string, holding back any tail that could be the
    beginning of one (so a stop string split across deltas is never emitted)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        buffer = self.held + text
        cut, self.stopped = _cut_at_stop_index(buffer, self.stops)
        if self.stopped:
            self.held = ""
            return buffer[:cut]
        keep = next(
            (k for k in range(min(len(buffer), max(map(len, self.stops)) - 1), 0, -1)
             if any(s.startswith(buffer[-k:]) for s in self.stops)),
            0,
        )
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.stopped else held


def _cut_at_stop_index(text: str, stops: list[str]) -> tuple[int, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (min(hits), True) if hits else (len(text), False)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut, hit = _cut_at_stop_index(text, stops)
    return text[:cut], hit


def _finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"  # tool_calls/content_filter/None: ended normally


def _detail(exc: openai.OpenAIError) -> str:
    """The server's own words, from the shapes in use: OpenAI/vLLM {"error": {"message"}},
    FastAPI {"detail"}, llama.cpp/transformers {"error": "..."} or {"message"}."""
    body = getattr(exc, "body", None)
    message: Any = None
    if isinstance(body, dict):
        message = body.get("detail") or body.get("message") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message") or message
    message = str(message or getattr(exc, "message", "") or type(exc).__name__)
    return message if len(message) <= 300 else message[:300] + "…"


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        return max(0.0, float(exc.response.headers.get("retry-after", "")))
    except (TypeError, ValueError):
        return None


def _display_url(url: str) -> str:
    """The URL without user:password and query string, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _close_soon(response) -> None:
    """Close an upstream response that will not be read (sync: HeldStream.release may run from
    ``__del__``); without a running loop the client's connection pool reclaims it."""
    try:
        asyncio.get_running_loop().create_task(response.close())
    except RuntimeError:
        pass


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _as_openai_error(exc: Exception) -> openai.OpenAIError:
    """``exc`` as the openai client's own error type: httpx timeouts and transport failures become
    APITimeoutError / APIConnectionError (with the httpx error as their cause)."""
    if isinstance(exc, openai.OpenAIError):
        return exc
    try:
        request = exc.request
    except RuntimeError:  # httpx raises this when the error was not tied to a request
        request = httpx.Request("POST", "http://engine.invalid/")
    error: openai.OpenAIError = (openai.APITimeoutError(request=request) if isinstance(exc, httpx.TimeoutException)
                                 else openai.APIConnectionError(request=request))
    error.__cause__ = exc
    return error


async def _until_text(events: AsyncIterator) -> list:
    """The events up to and including the first that carries text or ends the answer."""
    seen = []
    async for event in events:
        seen.append(event)
        if event.usage is not None or any(c.finish_reason or (c.delta and c.delta.content) for c in event.choices):
            break
    return seen
