"""Request dependencies: the container and the authenticated principal (RBAC on every route)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, Request

from app.api.errors import ApiError
from app.container import Container
from security.principal import Principal


def container(request: Request) -> Container:
    return request.app.state.container


def principal(request: Request, c: Container = Depends(container)) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    found = c.api_keys.authenticate(token.strip())
    if found is None:
        raise ApiError(401, "invalid, expired or revoked API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    who = found[0]
    request.state.principal = who
    return who


def require(*roles: str) -> Callable[..., Principal]:
    """Dependency that admits only the given roles (admin always passes)."""

    def check(who: Principal = Depends(principal)) -> Principal:
        if who.role != "admin" and who.role not in roles:
            raise ApiError(403, f"this operation needs one of the roles: {', '.join(('admin', *roles))}", "forbidden")
        return who

    return check


def readable_groups(who: Principal, default_groups: list[str]) -> Principal:
    """Every signed-in user belongs to the default groups (documents nobody restricted)."""
    if who.is_admin:
        return who
    return Principal(who.subject, who.role, tuple(sorted(set(who.groups) | set(default_groups))), who.knowledge_base)


def check_kb_access(who: Principal, kb: str) -> None:
    if who.knowledge_base is not None and who.knowledge_base != kb:
        raise ApiError(403, f"this key is limited to the knowledge base {who.knowledge_base!r}", "forbidden", "knowledge_base")
