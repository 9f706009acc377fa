"""Who may read what: the access rules every service applies, for API requests and CLI commands alike."""

from __future__ import annotations

from security.principal import Principal


class AccessDenied(PermissionError):
    """The principal may not do this (a 403 for API clients, ``denied`` in the audit record)."""

    http_status = 403
    error_code = "forbidden"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def readable_groups(who: Principal, default_groups: list[str]) -> Principal:
    """Every signed-in user belongs to the default groups (documents nobody restricted)."""
    if who.is_admin:
        return who
    return Principal(who.subject, who.role, tuple(sorted(set(who.groups) | set(default_groups))), who.knowledge_base)


def check_kb_access(who: Principal, kb: str) -> None:
    """A key pinned to one knowledge base reads that one only."""
    if who.knowledge_base is not None and who.knowledge_base != kb:
        raise AccessDenied(f"this key is limited to the knowledge base {who.knowledge_base!r}", "knowledge_base")
