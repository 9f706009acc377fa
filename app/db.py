"""Database engine and schema migrations (alembic), created on first start."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app.private import create_private_file, private_dir

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (the API) work while an ingest writes; foreign keys make cascades real.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """``hide_parameters``: a failed statement's error (logged, audited, shown) never carries its
    bound values: questions, answers and document text are parameters."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            private_dir(Path(path).parent)
            # SQLite gives its -wal/-shm/-journal files the database file's mode: create it 0600.
            # Only a missing file is opened here: closing a descriptor of a file drops all of this
            # process's POSIX locks on it, so touching a database another engine of this process
            # has open would leave SQLite believing it holds locks the kernel no longer knows, and
            # another process closing its connection would delete the write-ahead log under us
            # (tests/test_sqlite_locks.py).
            create_private_file(Path(path))
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                  hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; safe to call on every start)."""
    with engine.begin() as connection:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
