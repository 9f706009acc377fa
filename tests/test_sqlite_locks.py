"""SQLite's locks survive a second engine on the same file in one process.

POSIX record locks belong to the process, and closing *any* descriptor of a file drops all of the
process's locks on it (SQLite's "How To Corrupt An SQLite Database File", 2.2). `enclave serve`
migrates with one engine and then serves with another; if opening the second engine touched the
database file, the server would hold its read locks only in SQLite's bookkeeping, and another
process (a CLI command, a backup) that closed its connection would see itself as the last user,
checkpoint and delete the write-ahead log under the server: every later write failed with
"disk I/O error" (the audit log fails closed, so the API answered 503).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from app.db import make_engine, upgrade


def _other_process_reads_and_closes(path: Path) -> None:
    code = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1], timeout=30); "
            "db.execute('SELECT count(*) FROM sqlite_master').fetchall(); db.close()")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)


def test_a_second_engine_keeps_the_first_ones_locks(tmp_path: Path):
    path = tmp_path / "data" / "enclave.db"
    url = f"sqlite:///{path}"
    first = make_engine(url)
    upgrade(first)  # as `serve` does before the app builds its own engine
    held = first.connect()
    held.exec_driver_sql("BEGIN")
    held.exec_driver_sql("SELECT count(*) FROM sqlite_master").fetchall()  # a read lock, held open
    try:
        second = make_engine(url)
        with second.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))  # now in the write-ahead log
        wal, shm = path.with_name("enclave.db-wal"), path.with_name("enclave.db-shm")
        assert wal.exists() and shm.exists()

        _other_process_reads_and_closes(path)

        # The other process was not the last user: the log and its index are still there, and this
        # process goes on reading and writing.
        assert wal.exists() and shm.exists()
        with second.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (2)"))
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 2
        second.dispose()
    finally:
        held.rollback()
        held.close()
        first.dispose()


def test_a_new_database_file_is_created_private(tmp_path: Path):
    path = tmp_path / "data" / "enclave.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    assert path.stat().st_mode & 0o777 == 0o600
