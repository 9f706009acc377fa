"""Request side of the audit log: who and where from the request (the ``Actor`` services record),
and the ``action`` context manager for the few reads a router audits itself (see
app/services/audit.py for when records are written)."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from fastapi import Depends, Request

from app.api.deps import container
from app.api.errors import ApiError
from app.container import Container
from app.logs import REQUEST_ID
from app.services.audit import Actor, AuditService, AuditUnavailable
from app.services.operations import AsyncOperation

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
    """The audit of one request: ``async with trail.action("audit.status") as op:`` writes one record
    after the work (app/services/operations.py; services take ``actor(request)`` themselves)."""

    def __init__(self, service: AuditService, request: Request):
        self.service = service
        self.request = request

    def action(self, name: str, **fields: Any) -> AsyncOperation:
        return AsyncOperation(self.service, actor(self.request), name, **fields)


async def trail(request: Request, c: Container = Depends(container)) -> AuditTrail:
    return AuditTrail(c.audit, request)


def record_denial(request: Request, exc: ApiError) -> None:
    """Called by the error handler for every 401 and 403 no route recorded itself."""
    if getattr(exc, "audited", False):
        return
    action = "auth.failure" if exc.status_code == 401 else "access.denied"
    request.app.state.container.audit.record(
        actor(request), action, status="denied", detail=f"{exc.status_code} {exc.code or ''} {request.method} {request.url.path}")


__all__ = ["AuditTrail", "AuditUnavailable", "actor", "record_denial", "request_id", "trail"]
