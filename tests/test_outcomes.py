"""The one outcome table: what each failure means for the client (HTTP status, code) and the audit."""

from __future__ import annotations

from app.api.errors import ApiError
from app.services.audit import AuditUnavailable
from app.services.documents import DocumentNotFound
from app.services.outcomes import outcome_of
from llm.engine import EngineBusy, EngineError, PromptTooLong
from retrieval.store import KnowledgeBaseError, KnowledgeBaseNotFound
from security.api_keys import ApiKeyError, ApiKeyNotFound


def test_each_failure_has_one_meaning():
    cases = {
        KnowledgeBaseNotFound("unknown knowledge base 'x'"): (404, "knowledge_base", "failed"),
        KnowledgeBaseError("embedder mismatch"): (400, "knowledge_base", "failed"),
        DocumentNotFound("no document"): (404, "document_not_found", "failed"),
        ApiKeyError("bad role"): (400, "invalid_key_request", "failed"),
        ApiKeyNotFound("no key"): (404, "key_not_found", "failed"),
        PromptTooLong("too long"): (400, "context_length_exceeded", "failed"),
        EngineBusy("full"): (503, "server_busy", "failed"),
        EngineError("upstream"): (502, "engine_error", "error"),
        AuditUnavailable("disk"): (503, "audit_unavailable", "failed"),
        ApiError(403, "no", "forbidden"): (403, "forbidden", "denied"),
        ValueError("bug"): (500, "ValueError", "error"),
        KeyboardInterrupt(): (499, "cancelled", "cancelled"),
    }
    for exc, (status, code, audit) in cases.items():
        outcome = outcome_of(exc)
        assert (outcome.status, outcome.code, outcome.audit_status) == (status, code, audit), exc
        assert outcome.detail == f"{status} {code}"


def test_the_audit_detail_never_carries_the_message():
    secret = "unknown knowledge base 'salaries-of-the-board'"
    assert "salaries" not in outcome_of(KnowledgeBaseNotFound(secret)).detail
