"""The audit protocol of one operation, the same for an API request and a CLI command.

``with audited(audit, actor, "document.remove", knowledge_base=kb) as op:`` writes the ``started``
record first (nothing happens when it cannot be written: AuditUnavailable), runs the body, then the
outcome record: ``ok`` with the fields the body added through ``op.update(...)``, or the outcome of
the exception from app/services/outcomes.py (denied / failed / error with its status and code).
Reads whose result can be held back pass ``intent=False``: one record after the work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.services.audit import Actor, AuditService, AuditUnavailable
from app.services.outcomes import outcome_of


class Operation:
    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.status = "ok"

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)


@contextmanager
def audited(audit: AuditService, actor: Actor, action: str, *, intent: bool = True,
            **fields: Any) -> Iterator[Operation]:
    if intent:
        audit.record(actor, action, status="started", **fields)
    op = Operation(dict(fields))
    try:
        yield op
    except AuditUnavailable:
        raise  # the chain cannot take a record: there is nothing more to write
    except BaseException as exc:
        outcome = outcome_of(exc)
        detail = op.fields.get("detail")
        audit.record(actor, action, **{**op.fields, "status": outcome.audit_status,
                                       "detail": f"{outcome.detail}; {detail}" if detail else outcome.detail})
        raise
    audit.record(actor, action, **{**op.fields, "status": op.status})
