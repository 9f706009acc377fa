"""The fine-tuning adapter registry's changes (train + gate, promote, roll back), audited from CLI and API alike."""

from __future__ import annotations

from app.services.audit import Actor, AuditService
from app.services.operations import audited
from finetune.jobs import JobConfig, JobOutcome, run_job
from finetune.registry import Adapter, Registry


class AdapterService:
    def __init__(self, registry: Registry, audit: AuditService):
        self.registry = registry
        self.audit = audit

    def train(self, actor: Actor, config: JobConfig, *, trigger: str = "cli", **job) -> JobOutcome:
        """One fine-tuning job (finetune.jobs.run_job): it may promote the adapter it trains, a change
        of every later answer, so it is audited like a promotion (``started`` first, then the outcome
        with the new version). ``job``: run_job's keyword arguments (feedback, synthetic chunks, ...)."""
        with audited(self.audit, actor, "finetune.run", detail=f"trigger {trigger}") as op:
            outcome = run_job(config, self.registry, trigger=trigger, **job)
            op.update(detail=f"trigger {trigger}; {outcome.status}; adapter {outcome.version or '-'}")
        return outcome

    def promote(self, actor: Actor, version: str) -> Adapter:
        with audited(self.audit, actor, "adapter.promote", detail=f"adapter {version[:64]}"):
            return self.registry.promote(version)

    def rollback(self, actor: Actor) -> tuple[Adapter | None, Adapter | None]:
        with audited(self.audit, actor, "adapter.rollback") as op:
            retired, active = self.registry.rollback()
            op.update(detail=f"retired {retired.version if retired else '-'}; "
                             f"active {active.version if active else 'base model'}")
        return retired, active
