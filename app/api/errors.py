"""Errors in the OpenAI format: {"error": {"message", "type", "param", "code"}}, never a bare 500."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.engine import EngineBusy, EngineError, PromptTooLong
from retrieval.store import KnowledgeBaseError, KnowledgeBaseUnavailable

log = logging.getLogger("enclave.api")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Documented on every route: the errors any request can meet (auth, validation, limits, load).
COMMON_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (OpenAI error format)", 401: "Missing or invalid API key",
        403: "Role or knowledge base not allowed", 404: "Not found", 413: "Request body too large",
        415: "Unsupported file type", 429: "Rate limited", 502: "Generation failed",
        503: "Server busy, or the audit log cannot be written (code audit_unavailable)",
    }.items()
}


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.code, self.param = code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


AUDIT_UNAVAILABLE = "the audit log cannot be written; the request was not carried out (fail closed)"


class AnswerUnhandled:
    """Pure ASGI middleware, innermost of the application's own: an exception no handler took is
    logged once (method and path only: bodies hold questions and documents) and answered with the
    OpenAI-format 500. Left to Starlette, the 500 is sent by its outermost middleware, which then
    raises the exception again for the server: uvicorn logs it a second time (traceback and all)
    and closes the connection, which the client could see as a reset instead of the answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # a stream already under way just ends
                await error_response(500, "internal error; see the server log", "internal_error")(scope, receive, send)


def failure(exc: BaseException) -> tuple[int, dict, dict | None]:
    """(status, OpenAI error body, headers) of a failed operation, from the one outcome table
    (app/services/outcomes.py) shared with the audit records and the CLI; used for error responses
    and for the error event that ends a stream which fails after it started."""
    from app.services.audit import AuditUnavailable
    from app.services.outcomes import outcome_of

    outcome = outcome_of(exc)
    if isinstance(exc, AuditUnavailable):
        message = AUDIT_UNAVAILABLE  # the reason is for the server log, not the client
    elif outcome.code == "engine_error":
        message = f"generation failed: {exc}"
    else:
        message = str(exc)
    param = getattr(exc, "param", None) or ("messages" if outcome.code == "context_length_exceeded" else None)
    headers = {"Retry-After": "2"} if outcome.code == "server_busy" else None
    return outcome.status, error_body(outcome.status, message, outcome.code, param), headers


def install(app: FastAPI, on_denied: Callable[[Request, ApiError], None] | None = None) -> None:
    """``on_denied``: called (in a worker thread) for each 401/403, to audit it; if it raises
    AuditUnavailable the answer is a 503 instead."""
    from app.services.audit import AuditUnavailable

    app.add_middleware(AnswerUnhandled)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if on_denied is not None and exc.status_code in (401, 403):
            try:
                await run_in_threadpool(on_denied, request, exc)
            except AuditUnavailable:
                return error_response(503, AUDIT_UNAVAILABLE, "audit_unavailable")
        return error_response(exc.status_code, str(exc.detail), exc.code, exc.param, exc.headers)

    @app.exception_handler(AuditUnavailable)
    async def _audit_unavailable(_: Request, exc: AuditUnavailable):
        log.error("audit write failed: %s", exc)  # the reason is an exception type, never request data
        return error_response(503, AUDIT_UNAVAILABLE, "audit_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"{param + ': ' if param else ''}{first.get('msg')}", "invalid_request", param)

    async def _library_error(_: Request, exc: Exception):
        if isinstance(exc, KnowledgeBaseUnavailable):
            log.error("%s", exc)
        status, body, headers = failure(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    from app.services.access import AccessDenied
    from app.services.chat import ChatRefused
    from app.services.documents import DocumentNotFound, UploadRefused
    from security.api_keys import ApiKeyError

    for kind in (PromptTooLong, EngineBusy, EngineError, KnowledgeBaseError, DocumentNotFound, UploadRefused,
                 ApiKeyError, AccessDenied, ChatRefused):
        app.add_exception_handler(kind, _library_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Logged with the request path only: bodies may hold questions or documents.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; see the server log", "internal_error")
