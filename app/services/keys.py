"""API keys: create, list, revoke; audited the same from the CLI and the admin API."""

from __future__ import annotations

from datetime import timedelta

from app.services.audit import Actor, AuditService
from app.services.operations import audited
from security.api_keys import ApiKeyInfo, ApiKeyService


class KeyService:
    def __init__(self, keys: ApiKeyService, audit: AuditService):
        self.keys = keys
        self.audit = audit

    def create(self, actor: Actor, name: str, role: str = "user", groups: list[str] | None = None,
               knowledge_base: str | None = None, expires_days: int | None = None) -> tuple[str, ApiKeyInfo]:
        """The token (shown once, never recorded) and the stored key's description."""
        groups = list(groups or [])
        wanted = f"name {name!r}; role {role}; groups {','.join(groups)}; kb {knowledge_base or '-'}"
        with audited(self.audit, actor, "key.create", knowledge_base=knowledge_base, detail=wanted) as op:
            token, info = self.keys.create(name, role, groups, knowledge_base,
                                           timedelta(days=expires_days) if expires_days else None)
            op.update(detail=f"created key {info.key_id}; {wanted}")  # the key id, never the key
        return token, info

    def list(self, actor: Actor) -> list[ApiKeyInfo]:
        with audited(self.audit, actor, "key.list", intent=False):
            return self.keys.list()

    def revoke(self, actor: Actor, key_id: str) -> ApiKeyInfo:
        with audited(self.audit, actor, "key.revoke", detail=f"key {key_id[:64]}") as op:
            info = self.keys.revoke(key_id)
            op.update(detail=f"key {info.key_id}")
        return info
