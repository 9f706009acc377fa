"""Readiness that tells the truth: the database takes writes and is sane, the index files match
their checksums, the model is loaded.

A database that answers SELECT 1 may still refuse every request (a read-only data directory, a
corrupted SQLite page), so the probe makes a real write in a transaction it rolls back, and on
SQLite runs ``PRAGMA quick_check`` at most every ``QUICK_CHECK_SECONDS`` (it reads the whole file).
A knowledge base with damaged index files is reported by name; it alone is unavailable (its
searches answer 503), so the service stays ready for the others.
"""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from retrieval.store import KnowledgeBaseStore

QUICK_CHECK_SECONDS = 300.0


class Readiness:
    def __init__(self, engine: Engine, kb_store: KnowledgeBaseStore, quick_check_seconds: float = QUICK_CHECK_SECONDS):
        self.engine = engine
        self.kb_store = kb_store
        self.quick_check_seconds = quick_check_seconds
        self._checked_at: float | None = None
        self._quick_check = "ok"
        self._lock = threading.Lock()

    def database(self) -> str:
        sqlite = self.engine.dialect.name == "sqlite"
        try:
            with self.engine.connect() as conn:
                try:
                    # Wait briefly for the write lock: a lock held by an ingest proves writes work.
                    conn.exec_driver_sql("PRAGMA busy_timeout=500" if sqlite else "SET LOCAL lock_timeout = '500ms'")
                    # A write the database must accept (takes the write lock; changes nothing).
                    conn.execute(sa.text("UPDATE alembic_version SET version_num = version_num"))
                except sa.exc.OperationalError as exc:
                    if not _busy(exc):
                        raise
                finally:
                    conn.rollback()
                    if sqlite:
                        conn.exec_driver_sql("PRAGMA busy_timeout=30000")  # the pool's setting (app/db.py)
                        conn.rollback()
            if sqlite:
                return self._sqlite_quick_check()
        except Exception as exc:  # readiness reports, it does not raise
            return f"error: {type(exc).__name__}: {_first_line(exc)}"
        return "ok"

    def _sqlite_quick_check(self) -> str:
        with self._lock:
            now = time.monotonic()
            if self._checked_at is None or now - self._checked_at >= self.quick_check_seconds or self._quick_check != "ok":
                with self.engine.connect() as conn:
                    rows = [r[0] for r in conn.execute(sa.text("PRAGMA quick_check"))]
                self._quick_check = "ok" if rows == ["ok"] else f"error: quick_check: {rows[0]}"
                self._checked_at = now
            return self._quick_check

    def knowledge_bases(self) -> dict[str, str]:
        """Damaged knowledge bases and why (empty when all are fine)."""
        return self.kb_store.damaged()


def _busy(exc: sa.exc.OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "database is locked" in text or "lock timeout" in text


def _first_line(exc: Exception) -> str:
    # SQLAlchemy's messages continue with the statement and a link; the first line says what failed.
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
