"""One table from exceptions to outcomes, for the API's error responses, the audit records and the CLI.

Before this table the same exceptions were mapped three times (the API's error handlers, the audit's
``outcome_of`` and the CLI's error printer) and the copies disagreed: a knowledge-base error was a
404 for the client but "error KnowledgeBaseError" in the audit record. Each entry says, once, what
an exception means: the HTTP status, the OpenAI-style error code, and the audit status.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    status: int  # the HTTP status a client gets
    code: str  # the error code (OpenAI error format's "code"), also the audit detail
    audit_status: str  # denied | failed | error

    @property
    def detail(self) -> str:
        """The audit detail: status and code, never the exception's message (it may quote input)."""
        return f"{self.status} {self.code}".strip()


def _audit_status(status: int) -> str:
    if status in (401, 403):
        return "denied"
    return "failed" if status < 500 or status == 503 else "error"


def _table() -> list[tuple[type[BaseException], int, str]]:
    """Most specific first. Imported lazily: the libraries load heavy modules."""
    from app.backup import BackupError
    from app.services.audit import AuditUnavailable
    from finetune.jobs import JobLocked
    from finetune.registry import RegistryError
    from ingest.acl import AclError
    from ingest.pipeline import IngestError
    from llm.engine import EngineBusy, EngineError, PromptTooLong
    from retrieval.store import KnowledgeBaseError
    from security.api_keys import ApiKeyError

    return [
        (AuditUnavailable, 503, "audit_unavailable"),
        (PromptTooLong, 400, "context_length_exceeded"),
        (EngineBusy, 503, "server_busy"),
        (EngineError, 502, "engine_error"),
        (KnowledgeBaseError, 400, "knowledge_base"),
        (IngestError, 400, "ingest_error"),
        (AclError, 400, "acl_error"),
        (ApiKeyError, 400, "invalid_key_request"),
        (RegistryError, 400, "adapter_registry"),
        (JobLocked, 409, "job_running"),
        (BackupError, 400, "backup_error"),
    ]


def outcome_of(exc: BaseException) -> Outcome:
    """The outcome of a failed operation. An exception that carries its own HTTP status (the API's
    ApiError: ``status_code``/``code``; a service error: ``http_status``/``error_code``) keeps it."""
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        return Outcome(499, "cancelled", "cancelled")  # the operator or the client stopped it
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return Outcome(status, getattr(exc, "code", None) or "", _audit_status(status))
    for kind, status, code in _table():
        if isinstance(exc, kind):  # a subclass may be more precise (KnowledgeBaseNotFound: 404)
            status, code = getattr(exc, "http_status", status), getattr(exc, "error_code", code)
            return Outcome(status, code, _audit_status(status))
    status, code = getattr(exc, "http_status", None), getattr(exc, "error_code", None)
    if isinstance(status, int) and code:  # a service's own error (DocumentNotFound)
        return Outcome(status, code, _audit_status(status))
    return Outcome(500, type(exc).__name__, "error")
