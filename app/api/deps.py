"""Request dependencies: the container and the authenticated principal (RBAC on every route)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from pydantic import AfterValidator

from app.api.errors import ApiError
from app.container import Container
from app.uploads import Uploads
from retrieval.names import KB_NAME_RULE, is_kb_name
from security.api_keys import TOKEN_PREFIX, presented_key_id
from security.jwt_auth import TokenError, unverified_subject
from security.principal import Principal

log = logging.getLogger("enclave.security")


def _kb_name(name: str) -> str:
    if not is_kb_name(name):
        raise ValueError(f"invalid knowledge base name; use {KB_NAME_RULE}")
    return name


# A knowledge-base name from a request (body field or path): one that cannot be a knowledge base is
# a 400 before any path, query or audit record is built from it (retrieval.names).
KnowledgeBaseName = Annotated[str, AfterValidator(_kb_name)]


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the thread
# pool, and each such hop costs the event loop more than the work it wraps (docs/benchmarks.md,
# "Search over HTTP").
async def container(request: Request) -> Container:
    return request.app.state.container


async def uploads(request: Request) -> Uploads:
    return request.app.state.uploads


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def client_address(request: Request) -> str:
    """The client's address: the direct peer, or the X-Forwarded-For client a trusted proxy names
    (uvicorn's ProxyHeadersMiddleware rewrote it; see app.api.network)."""
    return request.client.host if request.client else "unknown"


def _too_many(wait: int, what: str) -> ApiError:
    return ApiError(429, f"rate limit exceeded ({what}); retry in {wait} s", "rate_limit_exceeded",
                    headers={"Retry-After": str(wait)})


def sign_in_key(token: str) -> str:
    """What failed sign-ins with ``token`` are counted under: the API key's id, the subject a JWT
    claims (unverified: a name for counting only), or else the token's own hash."""
    key_id = presented_key_id(token)
    if key_id is not None:
        return f"key:{key_id}"
    subject = unverified_subject(token)
    if subject is not None:
        return f"sub:{subject}"
    return "token:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]


def principal(request: Request, c: Container = Depends(container)) -> Principal:
    """Authenticates the bearer token: `enc_...` is an API key, anything else a JWT when OIDC is on.
    Then applies the failed-sign-in limits (per key and per address, security.rate_limit.SignInLimiter)
    and the request limit per principal."""
    token = _bearer(request)
    address = client_address(request)
    counted_as = sign_in_key(token)
    failures = c.auth_failure_limiter
    if failures is not None and (limited := failures.retry_after(address, counted_as)) is not None:
        raise _too_many(*limited)
    who: Principal | None = None
    if token.startswith(f"{TOKEN_PREFIX}_"):
        found = c.api_keys.authenticate(token)
        who = found[0] if found else None
        code, message = "invalid_api_key", "invalid, expired or revoked API key"
    else:
        code, message = "invalid_token", "invalid or expired bearer token"
        if c.oidc is not None:
            try:
                who = c.oidc.validate(token)
            except TokenError as exc:  # the reason goes to the log, never the token
                log.info("bearer token refused from %s: %s", address, exc)
        else:
            message = "invalid API key (bearer tokens other than API keys are not enabled)"
    if who is None:
        if failures is not None:
            failures.failed(address, counted_as)
        raise ApiError(401, message, code, headers={"WWW-Authenticate": f'Bearer error="{code}"'})
    if failures is not None:
        failures.succeeded(address, counted_as)
    if who.role == "service" and who.knowledge_base is None:
        # Service accounts only ever act within one knowledge base; an unpinned one is refused.
        raise ApiError(403, "service accounts must be limited to one knowledge base", "forbidden")
    limiter = c.rate_limiter
    if limiter is not None and (wait := limiter.hit(who.subject)) is not None:
        raise _too_many(wait, f"{c.settings.security.rate_limit_per_minute} requests per minute per key")
    request.state.principal = who
    return who


def require(*roles: str) -> Callable[..., Principal]:
    """Dependency that admits only the given roles (admin always passes)."""

    async def check(who: Principal = Depends(principal)) -> Principal:
        if who.role != "admin" and who.role not in roles:
            raise ApiError(403, f"this operation needs one of the roles: {', '.join(('admin', *roles))}", "forbidden")
        return who

    check.roles = frozenset(("admin", *roles))  # read by the RBAC test and docs/security.md's table
    return check
