"""The audit protocol of one operation, the same for an API request and a CLI command.

``with audited(audit, actor, "document.remove", knowledge_base=kb) as op:`` writes the ``started``
record first (nothing happens when it cannot be written: AuditUnavailable), runs the body, then the
outcome record: ``ok`` with the fields the body added through ``op.update(...)``, or the outcome of
the exception from app/services/outcomes.py (denied / failed / error with its status and code).
Reads whose result can be held back pass ``intent=False``: one record after the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from fastapi.concurrency import run_in_threadpool

from app.services.audit import Actor, AuditService, AuditUnavailable
from app.services.outcomes import outcome_of


class Operation:
    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.status = "ok"

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)


T = TypeVar("T")


class Later(Generic[T]):
    """A dependency built on first use (the retriever, the generation engine): a request refused by
    its access check never loads a model."""

    def __init__(self, build: Callable[[], T]):
        self._build = build

    def __call__(self) -> T:
        return self._build()


def resolved(value: "T | Later[T]") -> T:
    return value() if isinstance(value, Later) else value


def _failed(fields: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The outcome record's fields for an operation that raised ``exc`` (its status and code first in
    the detail, never the exception's message: it may quote input)."""
    outcome = outcome_of(exc)
    detail = fields.get("detail")
    try:
        exc.audited = True  # the API's error handler must not record a 401/403 a second time
    except AttributeError:
        pass
    return {**fields, "status": outcome.audit_status,
            "detail": f"{outcome.detail}; {detail}" if detail else outcome.detail}


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
        audit.record(actor, action, **_failed(op.fields, exc))
        raise
    audit.record(actor, action, **{**op.fields, "status": op.status})


class AsyncOperation:
    """The same protocol for async work whose records are written at chosen points (chat): ``start()``
    writes the ``started`` record, ``finish(exc)`` the outcome once; records are written from a
    worker thread. ``async with`` gives one record after the work (a read that can be held back)."""

    def __init__(self, audit: AuditService, actor: Actor, action: str, **fields: Any):
        self.audit, self.actor, self.action, self.fields = audit, actor, action, fields
        self.done = False

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    async def start(self) -> None:
        await run_in_threadpool(self.audit.record, self.actor, self.action, status="started", **self.fields)

    async def finish(self, exc: BaseException | None = None, status: str = "ok") -> None:
        if self.done:
            return
        self.done = True
        fields = _failed(self.fields, exc) if exc is not None else {**self.fields, "status": status}
        await run_in_threadpool(self.audit.record, self.actor, self.action, **fields)

    def finish_sync(self, status: str, **fields: Any) -> None:
        """For work the client abandoned: the task is being cancelled, so no awaiting."""
        if not self.done:
            self.done = True
            self.audit.record(self.actor, self.action, **{**self.fields, **fields, "status": status})

    async def __aenter__(self) -> "AsyncOperation":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if not isinstance(exc, AuditUnavailable):
            await self.finish(exc)
        return False
