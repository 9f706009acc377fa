"""Request side of the audit log: who/where from the request, and the ``action`` context manager
that routers wrap their work in (see app/services/audit.py for when records are written)."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from app.api.deps import container
from app.api.errors import ApiError
from app.container import Container
from app.logs import REQUEST_ID
from app.services import outcomes
from app.services.audit import Actor, AuditService, AuditUnavailable

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # as the middleware accepts; the column holds 128
# The public key id inside an API key (enc_<key id>_<secret>); only it is recorded, never the token.
_KEY_ID = re.compile(r"enc_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")


def request_id(request: Request) -> str:
    """The request id of the access log and the X-Request-ID response header (set by
    RequestContextMiddleware); outside it (an app without that middleware) the caller's
    well-formed X-Request-ID or a new random one, once per request."""
    rid = REQUEST_ID.get() or getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(12)
        request.state.request_id = rid
    return rid


def actor(request: Request) -> Actor:
    who = getattr(request.state, "principal", None)
    subject = who.subject if who is not None else None
    key_id = getattr(request.state, "key_id", None)
    if key_id is None and subject and subject.startswith("key:"):
        key_id = subject[4:]
    if who is None:  # a failed sign-in: the key id the caller claimed, when the token has the shape of one
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        match = _KEY_ID.fullmatch(token)
        key_id = match.group(1) if match else None
    ip = getattr(request.state, "client_ip", None) or (request.client.host if request.client else None)
    started = getattr(request.state, "started", None) or time.perf_counter()
    return Actor(request_id(request), subject, key_id, who.role if who is not None else None, ip, started)


class AuditTrail:
    def __init__(self, service: AuditService, request: Request):
        self.service = service
        self.request = request

    def write_sync(self, action: str, **fields: Any) -> None:
        self.service.record(actor(self.request), action, **fields)

    async def write(self, action: str, **fields: Any) -> None:
        await run_in_threadpool(self.write_sync, action, **fields)

    def action(self, name: str, *, intent: bool = False, **fields: Any) -> "AuditedAction":
        return AuditedAction(self, name, intent, fields)


def outcome_of(exc: BaseException) -> tuple[str, str]:
    """(status, detail) of a failed request, from the one outcome table (app/services/outcomes.py):
    the status and error code, never the exception's message (it may quote input)."""
    outcome = outcomes.outcome_of(exc)
    return outcome.audit_status, outcome.detail


class AuditedAction:
    """``async with trail.action("kb.delete", intent=True, knowledge_base=name) as act:`` -- the
    router sets further fields with ``act.update(...)``; the outcome record is written on exit."""

    def __init__(self, trail: AuditTrail, name: str, intent: bool, fields: dict[str, Any]):
        self.trail, self.name, self.intent, self.fields = trail, name, intent, fields
        self.done = False

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)

    async def __aenter__(self) -> "AuditedAction":
        if self.intent:
            await self.start()
        return self

    async def start(self) -> None:
        """The ``started`` record, before an effect that cannot be held back (raises AuditUnavailable)."""
        await self.trail.write(self.name, status="started", **self.fields)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        await self.finish(exc)
        return False

    async def finish(self, exc: BaseException | None = None, status: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        fields = dict(self.fields)
        if exc is not None:
            status, code = outcome_of(exc)
            fields["detail"] = f"{code}; {fields['detail']}" if fields.get("detail") else code
            if isinstance(exc, ApiError):
                exc.audited = True  # the error handler must not record it twice
        await self.trail.write(self.name, status=status or "ok", **fields)

    def finish_sync(self, status: str, **fields: Any) -> None:
        """For a stream the client abandoned: the task is being cancelled, so no awaiting."""
        if not self.done:
            self.done = True
            self.trail.write_sync(self.name, status=status, **{**self.fields, **fields})


def trail(request: Request, c: Container = Depends(container)) -> AuditTrail:
    return AuditTrail(c.audit, request)


def record_denial(request: Request, exc: ApiError) -> None:
    """Called by the error handler for every 401 and 403 no route recorded itself."""
    if getattr(exc, "audited", False):
        return
    action = "auth.failure" if exc.status_code == 401 else "access.denied"
    request.app.state.container.audit.record(
        actor(request), action, status="denied", detail=f"{exc.status_code} {exc.code or ''} {request.method} {request.url.path}")


__all__ = ["AuditTrail", "AuditUnavailable", "actor", "record_denial", "request_id", "trail"]
