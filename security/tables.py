"""SQL tables owned by the security package."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "sec_api_key"

    # Public identifier, embedded in the token (enc_<key_id>_<secret>) so lookups need no scan.
    key_id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=128)
    # HMAC-SHA256 of the whole token under the server's secret: a stolen database alone cannot be
    # used to test guesses offline, and the token itself is never stored.
    key_hash: str = Field(max_length=64)
    role: str = Field(max_length=16)
    groups: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON list
    knowledge_base: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


# --- audit log (security/audit.py) ------------------------------------------------------------------
# Every value is a string, an integer or null, stored exactly as it was hashed (the time as its ISO
# text, the chunk ids as canonical JSON), so that verification recomputes the very same bytes.


class AuditRecordRow(SQLModel, table=True):
    __tablename__ = "sec_audit_record"

    # Assigned by the writer under the chain lock: gap-free and unique (the primary key).
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    time: str = Field(max_length=40, index=True)
    request_id: str | None = Field(default=None, max_length=128)
    subject: str | None = Field(default=None, max_length=256)
    key_id: str | None = Field(default=None, max_length=64)
    role: str | None = Field(default=None, max_length=16)
    source_ip: str | None = Field(default=None, max_length=64)
    action: str = Field(max_length=64)
    knowledge_base: str | None = Field(default=None, max_length=128)
    query_sha256: str | None = Field(default=None, max_length=64)
    query_text: str | None = Field(default=None, sa_column=Column(Text))
    chunk_ids: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    model: str | None = Field(default=None, max_length=256)
    adapter: str | None = Field(default=None, max_length=256)
    answer_sha256: str | None = Field(default=None, max_length=64)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: int | None = None
    status: str = Field(max_length=32)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHeadRow(SQLModel, table=True):
    """One row (id 1): the newest record's seq and hash. Writers lock it (SELECT ... FOR UPDATE on
    PostgreSQL); it also shows records cut from the end of the chain."""

    __tablename__ = "sec_audit_head"

    id: int = Field(primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(max_length=64)


class AuditCheckpointRow(SQLModel, table=True):
    """An Ed25519 signature over (seq, hash, time, key id) of the record at ``seq``."""

    __tablename__ = "sec_audit_checkpoint"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    hash: str = Field(max_length=64)
    time: str = Field(max_length=40)
    key_id: str = Field(max_length=64)
    signature: str = Field(sa_column=Column(Text, nullable=False))  # base64
