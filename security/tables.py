"""SQL tables owned by the security package."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Column, Text
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
