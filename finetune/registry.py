"""The adapter registry and the job history, in SQL (migration 0006_finetune).

Statuses: ``candidate`` (trained and evaluated, not serving), ``active`` (at most one: what the
service uses), ``retired`` (was active once, replaced or rolled back). Promoting records which
adapter was active before, so ``rollback`` re-activates exactly that one (or the base model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Column, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AdapterRow(SQLModel, table=True):
    __tablename__ = "ft_adapter"

    version: str = Field(primary_key=True, max_length=32)
    base_model: str = Field(max_length=256)
    base_model_hash: str = Field(max_length=64)
    dataset_hash: str = Field(index=True, max_length=64)
    path: str = Field(sa_column=Column(Text, nullable=False))  # the peft adapter folder
    hyperparameters: str = Field(sa_column=Column(Text, nullable=False))  # JSON
    metrics: str = Field(sa_column=Column(Text, nullable=False))  # JSON: per variant + gate decision
    status: str = Field(index=True, max_length=16)
    previous_version: str | None = Field(default=None, max_length=32)  # active before this one was promoted
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None


class JobRow(SQLModel, table=True):
    __tablename__ = "ft_job"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, primary_key=True)
    trigger: str = Field(max_length=16)  # cli | schedule
    status: str = Field(max_length=16)  # running | promoted | candidate | no_new_data | failed
    version: str | None = Field(default=None, max_length=32)
    dataset_hash: str | None = Field(default=None, max_length=64)
    message: str = Field(default="", sa_column=Column(Text, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class RegistryError(RuntimeError):
    pass


@dataclass
class Adapter:
    version: str
    base_model: str
    base_model_hash: str
    dataset_hash: str
    path: str
    hyperparameters: dict
    metrics: dict
    status: str
    previous_version: str | None
    created_at: datetime
    promoted_at: datetime | None

    @classmethod
    def of(cls, row: AdapterRow) -> "Adapter":
        return cls(row.version, row.base_model, row.base_model_hash, row.dataset_hash, row.path,
                   json.loads(row.hyperparameters), json.loads(row.metrics), row.status, row.previous_version,
                   row.created_at, row.promoted_at)


class Registry:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- adapters -------------------------------------------------------------------------------

    def next_version(self) -> str:
        with Session(self.engine) as session:
            count = len(list(session.exec(select(AdapterRow.version))))
        return f"v{count + 1:04d}"

    def add(self, version: str, *, base_model: str, base_model_hash: str, dataset_hash: str, path: str,
            hyperparameters: dict, metrics: dict) -> Adapter:
        row = AdapterRow(version=version, base_model=base_model, base_model_hash=base_model_hash,
                         dataset_hash=dataset_hash, path=path, hyperparameters=json.dumps(hyperparameters),
                         metrics=json.dumps(metrics, default=str), status="candidate")
        with Session(self.engine) as session:
            session.add(row)
            session.commit()
            session.refresh(row)
            return Adapter.of(row)

    def get(self, version: str) -> Adapter | None:
        with Session(self.engine) as session:
            row = session.get(AdapterRow, version)
            return Adapter.of(row) if row else None

    def list(self) -> list[Adapter]:
        with Session(self.engine) as session:
            return [Adapter.of(r) for r in session.exec(select(AdapterRow).order_by(AdapterRow.created_at,
                                                                                   AdapterRow.version))]

    def active(self) -> Adapter | None:
        with Session(self.engine) as session:
            row = session.exec(select(AdapterRow).where(AdapterRow.status == "active")).first()
            return Adapter.of(row) if row else None

    def active_version(self) -> str | None:
        """Cheap poll for the serving side (one indexed query)."""
        with Session(self.engine) as session:
            return session.exec(select(AdapterRow.version).where(AdapterRow.status == "active")).first()

    def find_trained(self, dataset_hash: str, base_model_hash: str) -> Adapter | None:
        """An adapter already trained on exactly this data and base model (any status)."""
        with Session(self.engine) as session:
            row = session.exec(select(AdapterRow).where(AdapterRow.dataset_hash == dataset_hash,
                                                        AdapterRow.base_model_hash == base_model_hash)).first()
            return Adapter.of(row) if row else None

    def promote(self, version: str) -> Adapter:
        """Make ``version`` the active adapter; the one active before is retired (rollback returns to it)."""
        with Session(self.engine) as session:
            row = session.get(AdapterRow, version)
            if row is None:
                raise RegistryError(f"no adapter {version!r}; see `finetune list`")
            if row.status == "active":
                return Adapter.of(row)
            current = session.exec(select(AdapterRow).where(AdapterRow.status == "active")).first()
            if current is not None:
                current.status = "retired"
                session.add(current)
                session.flush()
            row.status = "active"
            row.previous_version = current.version if current is not None else None
            row.promoted_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return Adapter.of(row)

    def rollback(self) -> tuple[Adapter | None, Adapter | None]:
        """Retire the active adapter and re-activate the one before it; returns (retired, now active or None)."""
        with Session(self.engine) as session:
            current = session.exec(select(AdapterRow).where(AdapterRow.status == "active")).first()
            if current is None:
                raise RegistryError("no adapter is active: nothing to roll back (the base model is serving)")
            current.status = "retired"
            session.add(current)
            session.flush()
            previous = session.get(AdapterRow, current.previous_version) if current.previous_version else None
            if previous is not None:
                previous.status = "active"
                session.add(previous)
            session.commit()
            return Adapter.of(current), (Adapter.of(previous) if previous is not None else None)

    # --- jobs -----------------------------------------------------------------------------------

    def start_job(self, trigger: str) -> int:
        with Session(self.engine) as session:
            row = JobRow(trigger=trigger, status="running")
            session.add(row)
            session.commit()
            return row.id

    def finish_job(self, job_id: int, status: str, message: str, *, version: str | None = None,
                   dataset_hash: str | None = None) -> None:
        with Session(self.engine) as session:
            row = session.get(JobRow, job_id)
            row.status, row.message, row.version, row.dataset_hash = status, message, version, dataset_hash
            row.finished_at = utcnow()
            session.add(row)
            session.commit()

    def jobs(self, limit: int = 20) -> list[JobRow]:
        with Session(self.engine) as session:
            rows = list(session.exec(select(JobRow).order_by(JobRow.id.desc()).limit(limit)))
            for r in rows:
                session.expunge(r)
            return rows
