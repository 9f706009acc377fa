"""Conversations, their messages (with the sources each answer cited) and feedback, in SQL.

Owned by ``app``: they tie together principals, knowledge bases and completions. Feedback rows are
the raw material of fine-tuning.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Column, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, select


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ConversationRow(SQLModel, table=True):
    __tablename__ = "app_conversation"

    id: str = Field(primary_key=True, max_length=40)
    subject: str = Field(index=True, max_length=128)  # the principal that owns it
    user: str | None = Field(default=None, max_length=256)  # the OpenAI `user` field, as sent
    knowledge_base: str | None = Field(default=None, max_length=128)
    title: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class MessageRow(SQLModel, table=True):
    __tablename__ = "app_message"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="app_conversation.id", index=True, max_length=40)
    role: str = Field(max_length=16)
    content: str = Field(sa_column=Column(Text, nullable=False))
    completion_id: str | None = Field(default=None, index=True, max_length=64)
    sources: str | None = Field(default=None, sa_column=Column(Text))  # JSON list, for assistant turns
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class FeedbackRow(SQLModel, table=True):
    __tablename__ = "app_feedback"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, primary_key=True)
    completion_id: str = Field(index=True, max_length=64)
    subject: str = Field(max_length=128)
    rating: int  # +1 helpful, -1 not helpful
    correction: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)


@dataclass
class StoredTurn:
    role: str
    content: str
    completion_id: str | None
    sources: list[dict]
    created_at: datetime


class ConversationStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def record_exchange(
        self, conversation_id: str | None, subject: str, user: str | None, kb: str | None, question: str,
        answer: str, completion_id: str, sources: list[dict], prompt_tokens: int, completion_tokens: int,
    ) -> str:
        with Session(self.engine) as session:
            row = session.get(ConversationRow, conversation_id) if conversation_id else None
            if row is None or row.subject != subject:
                row = ConversationRow(id=new_id("conv"), subject=subject, user=user, knowledge_base=kb, title=question[:120])
                session.add(row)
                session.flush()
            row.updated_at = utcnow()
            session.add(MessageRow(conversation_id=row.id, role="user", content=question))
            session.add(MessageRow(conversation_id=row.id, role="assistant", content=answer, completion_id=completion_id,
                                   sources=json.dumps(sources, ensure_ascii=False), prompt_tokens=prompt_tokens,
                                   completion_tokens=completion_tokens))
            session.commit()
            return row.id

    def list(self, subject: str | None, limit: int = 50) -> list[ConversationRow]:
        """Conversations of ``subject`` (None: everyone's, for administrators), newest first."""
        with Session(self.engine) as session:
            query = select(ConversationRow).order_by(ConversationRow.updated_at.desc()).limit(limit)
            if subject is not None:
                query = query.where(ConversationRow.subject == subject)
            return list(session.exec(query))

    def turns(self, conversation_id: str, subject: str | None) -> list[StoredTurn] | None:
        with Session(self.engine) as session:
            row = session.get(ConversationRow, conversation_id)
            if row is None or (subject is not None and row.subject != subject):
                return None  # someone else's conversation looks exactly like a missing one
            messages = session.exec(
                select(MessageRow).where(MessageRow.conversation_id == conversation_id).order_by(MessageRow.id)
            )
            return [StoredTurn(m.role, m.content, m.completion_id, json.loads(m.sources) if m.sources else [], m.created_at)
                    for m in messages]

    def completion_owner(self, completion_id: str) -> str | None:
        with Session(self.engine) as session:
            message = session.exec(select(MessageRow).where(MessageRow.completion_id == completion_id)).first()
            if message is None:
                return None
            return session.get(ConversationRow, message.conversation_id).subject

    def add_feedback(self, completion_id: str, subject: str, rating: int, correction: str | None) -> int:
        with Session(self.engine) as session:
            row = FeedbackRow(completion_id=completion_id, subject=subject, rating=rating, correction=correction)
            session.add(row)
            session.commit()
            return row.id


    def feedback_for_training(self, history_turns: int = 2) -> list:
        """Rated answers as ``finetune.dataset.FeedbackRecord``: the question (with up to
        ``history_turns`` earlier exchanges of its conversation), the answer, rating and correction.

        The stored question is what the user typed (not the retrieval prompt), so an adapter learns
        the organisation's answers themselves. The latest feedback per completion wins.
        """
        from finetune.dataset import FeedbackRecord

        records = []
        with Session(self.engine) as session:
            latest: dict[str, FeedbackRow] = {}
            for row in session.exec(select(FeedbackRow).order_by(FeedbackRow.id)):
                latest[row.completion_id] = row
            for completion_id, fb in latest.items():
                answer = session.exec(select(MessageRow).where(MessageRow.completion_id == completion_id)).first()
                if answer is None:
                    continue
                before = list(session.exec(
                    select(MessageRow).where(MessageRow.conversation_id == answer.conversation_id,
                                             MessageRow.id < answer.id).order_by(MessageRow.id.desc())
                    .limit(2 * history_turns + 1)))[::-1]
                while before and before[0].role != "user":
                    before = before[1:]
                if not before or before[-1].role != "user":
                    continue
                records.append(FeedbackRecord(
                    id=str(fb.id), messages=[{"role": m.role, "content": m.content} for m in before],
                    answer=answer.content, rating=fb.rating, correction=fb.correction,
                ))
        return records


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
