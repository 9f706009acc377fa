"""SQL tables owned by the knowledge-base store.

The database is the source of truth for chunks (text, groups and the embedding itself); the FAISS
file per knowledge base is a derived, atomically published copy of the vectors that is reconciled
against these rows after a crash.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, ForeignKey, Integer, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias); PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def encode_groups(groups: list[str] | set[str] | tuple[str, ...]) -> str:
    """Groups are stored as a canonical JSON list (sorted, unique) so equality is a string compare."""
    return json.dumps(sorted(set(groups)), ensure_ascii=False)


def decode_groups(value: str) -> list[str]:
    return list(json.loads(value))


class KnowledgeBaseRow(SQLModel, table=True):
    __tablename__ = "kb_knowledge_base"

    name: str = Field(primary_key=True, max_length=128)
    embedder: str = Field(max_length=256)
    dimension: int
    created_at: datetime = Field(default_factory=utcnow)
    # Bumped on every committed change; the published index records the generation it holds.
    generation: int = 0


class DocumentRow(SQLModel, table=True):
    __tablename__ = "kb_document"
    __table_args__ = (
        UniqueConstraint("kb", "root", "source", name="uq_kb_document_source"),
        # Ids are never reused (SQLite would otherwise hand out max(rowid)+1 again after deletes).
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    kb: str = Field(
        sa_column=Column(Text, ForeignKey("kb_knowledge_base.name", ondelete="CASCADE"), index=True, nullable=False)
    )
    # Absolute path of the folder given to `ingest run` ("" for uploads); `source` is relative to it.
    root: str = Field(sa_column=Column(Text, nullable=False))
    source: str = Field(sa_column=Column(Text, nullable=False))
    file_type: str = Field(max_length=16)
    title: str | None = Field(default=None, sa_column=Column(Text))
    content_hash: str = Field(max_length=64)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    groups: str = Field(sa_column=Column(Text, nullable=False))
    chunk_count: int = 0
    ingested_at: datetime = Field(default_factory=utcnow)
    modified_at: datetime | None = None  # the file's modification time, for date filters
    # What produced the document's chunks and vectors (embedder, chunker and its settings, see
    # KnowledgeBaseStore.index_version); null for documents stored before it was recorded. A
    # document whose value differs from the running configuration is stale: `ingest reindex`
    # rebuilds it.
    index_version: str | None = Field(default=None, sa_column=Column(Text))


class ChunkRow(SQLModel, table=True):
    __tablename__ = "kb_chunk"
    # Chunk ids are the FAISS ids: they must never be reused, or a stale index entry could pass for
    # a new chunk after a crash. PostgreSQL sequences never reuse; SQLite needs AUTOINCREMENT.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    document_id: int = Field(
        sa_column=Column(BigInteger, ForeignKey("kb_document.id", ondelete="CASCADE"), index=True, nullable=False)
    )
    kb: str = Field(sa_column=Column(Text, index=True, nullable=False))
    ordinal: int
    text: str = Field(sa_column=Column(Text, nullable=False))
    page: int | None = None
    heading: str | None = Field(default=None, sa_column=Column(Text))
    # Denormalised from the document so every chunk carries who may read it.
    groups: str = Field(sa_column=Column(Text, nullable=False))
    # float32 little-endian vector, normalised; lets the index be rebuilt without the model.
    embedding: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class IngestRunRow(SQLModel, table=True):
    __tablename__ = "kb_ingest_run"

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    kb: str = Field(sa_column=Column(Text, index=True, nullable=False))
    root: str = Field(sa_column=Column(Text, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    status: str = Field(default="running", max_length=16)  # running | finished | failed
    report: str | None = Field(default=None, sa_column=Column(Text))  # JSON summary
