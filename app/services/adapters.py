"""The fine-tuning adapter registry's changes (promote, roll back), audited from CLI and API alike."""

from __future__ import annotations

from app.services.audit import Actor, AuditService
from app.services.operations import audited
from finetune.registry import Adapter, Registry


class AdapterService:
    def __init__(self, registry: Registry, audit: AuditService):
        self.registry = registry
        self.audit = audit

    def promote(self, actor: Actor, version: str) -> Adapter:
        with audited(self.audit, actor, "adapter.promote", detail=f"adapter {version[:64]}"):
            return self.registry.promote(version)

    def rollback(self, actor: Actor) -> tuple[Adapter | None, Adapter | None]:
        with audited(self.audit, actor, "adapter.rollback") as op:
            retired, active = self.registry.rollback()
            op.update(detail=f"retired {retired.version if retired else '-'}; "
                             f"active {active.version if active else 'base model'}")
        return retired, active
