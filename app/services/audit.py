"""The audit service: turns what a request did into records of the hash chain, and fails closed.

Any failure to write a record raises :class:`AuditUnavailable` (the API answers HTTP 503,
``audit_unavailable``) and counts in ``enclave_audit_write_failures_total``: nothing is answered,
changed or disclosed without its record.

When a record is written relative to the work (documented in docs/architecture.md, "Audit"):

* reads whose result can be held back (non-streamed chat, search, embeddings, admin listings): one
  record after the work, before the response leaves;
* changes (documents, knowledge bases, keys) and streamed chat, whose effect cannot be held back
  once done: a ``started`` record first (the request fails before anything happens or any token
  is sent when it cannot be written), then the outcome record (ok / failed / denied / cancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from security.audit import AppendResult, AuditError, AuditEvent, AuditLog, canonical_json, sha256_hex
from security.pii import PiiRedactor

log = logging.getLogger(__name__)

AUDIT_WRITE_FAILURES = Counter(
    "enclave_audit_write_failures", "Audit records that could not be written (the request failed closed)")


class AuditUnavailable(Exception):
    """The audit record could not be written: the request must fail."""


@dataclass
class Actor:
    """Who and where, for one request or CLI command."""

    request_id: str | None = None
    subject: str | None = None
    key_id: str | None = None
    role: str | None = None
    source_ip: str | None = None
    started: float = field(default_factory=time.perf_counter)


class AuditService:
    def __init__(self, log: AuditLog, redactor: PiiRedactor, *, query_policy: str = "redact",
                 max_query_chars: int = 2000, model: str | None = None,
                 adapter: Callable[[], str | None] = lambda: None):
        if query_policy not in ("none", "redact", "drop"):
            raise ValueError("query_policy must be none, redact or drop")
        self.log = log
        self.redactor = redactor
        self.query_policy = query_policy
        self.max_query_chars = max_query_chars
        self.model = model
        self.adapter = adapter

    def query_fields(self, query: str | list[str] | None, keep_text: bool = True) -> dict[str, Any]:
        """sha256 of the full query (a list: of its canonical JSON) and the text the policy keeps."""
        if query is None:
            return {}
        digest = sha256_hex(canonical_json(query) if isinstance(query, list) else query)
        text = None
        if keep_text and self.query_policy != "drop" and isinstance(query, str):
            text = self.redactor.redact(query) if self.query_policy == "redact" else query
            text = text[: self.max_query_chars]
        return {"query_sha256": digest, "query_text": text}

    def event(self, actor: Actor, action: str, *, query: str | list[str] | None = None, keep_query_text: bool = True,
              answer: str | None = None, generation: bool = False, **fields: Any) -> AuditEvent:
        values: dict[str, Any] = {
            "request_id": actor.request_id, "subject": actor.subject, "key_id": actor.key_id, "role": actor.role,
            "source_ip": actor.source_ip, "latency_ms": int((time.perf_counter() - actor.started) * 1000),
            **self.query_fields(query, keep_query_text),
        }
        if answer is not None:
            values["answer_sha256"] = sha256_hex(answer)
        if generation:
            values["model"], values["adapter"] = self.model, self.adapter()
        values.update({k: v for k, v in fields.items() if v is not None})
        return AuditEvent(action=action, **values)

    def write(self, event: AuditEvent) -> AppendResult:
        try:
            return self.log.append(event)
        except AuditError as exc:
            AUDIT_WRITE_FAILURES.inc()
            # The operator needs the cause (the client only learns "cannot be written"); statements
            # are logged without their bound values (hide_parameters), so no query text leaks here.
            log.error("audit record %s for %s not written: %s", event.action, event.subject, exc.__cause__ or exc)
            raise AuditUnavailable(str(exc)) from exc
        except Exception as exc:  # anything else on the way: still fail closed, still counted
            AUDIT_WRITE_FAILURES.inc()
            log.error("audit record %s for %s not written: %r", event.action, event.subject, exc)
            raise AuditUnavailable(f"audit write failed: {type(exc).__name__}") from exc

    def record(self, actor: Actor, action: str, **fields: Any) -> AppendResult:
        return self.write(self.event(actor, action, **fields))
