"""Backup and restore of one Enclave installation: database, data directory, manifest of hashes.

A backup is a directory::

    manifest.json          format, creation time, database kind and schema revision, and the sha256
                           and size of every other file in the backup
    database/enclave.db    SQLite: a consistent copy made with SQLite's online backup API
    database/<table>.jsonl PostgreSQL: a logical dump, one JSON object per row, of every table
    data/...               the data directory (indexes, adapters, audit checkpoints, secrets,
                           uploads, ...) without the models (re-provisioned by `enclave models pull`)
                           and without the SQLite files (copied above)

Why a logical dump for PostgreSQL rather than pg_dump: pg_dump must be at least the server's
major version and is often absent from application containers; the dump through SQLAlchemy needs
nothing but the connection the service already has, and it restores inside ONE transaction (DDL is
transactional in PostgreSQL), so a failed restore leaves the database as it was.

Restore checks the whole backup first (every file's hash and size, no file missing, none extra,
the SQLite copy's integrity) and refuses a damaged or tampered backup before touching anything.
Then it stages the data files next to the live ones, restores the database (one transaction, or
SQLite's backup API into the live file), and swaps the staged entries in by rename.

Stop the API processes and ingestion while restoring, and start them afterwards: a running
process keeps the index snapshot it loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command

from app.db import alembic_config, current_revision, make_engine, upgrade
from app.private import create_private_file, make_private, open_private, private_dir
from app.settings import Settings
from security.integrity import sha256_file

FORMAT = "enclave-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BackupError(Exception):
    """The backup cannot be made or restored; the message says why and what to do."""


@dataclass
class BackupSummary:
    path: Path
    files: int
    bytes: int
    database: str
    revision: str | None
    manifest_sha256: str
    tables: dict[str, int]


# --- helpers ---------------------------------------------------------------------------------------

def _sqlite_path(url: str) -> Path | None:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up")
    return Path(parsed.database).resolve()


def _excluded(settings: Settings) -> set[Path]:
    """Paths under the data directory that are not copied as files (nor replaced by a restore):
    the models, the SQLite files, and ``cache/`` (derived from the models: the exported ONNX query
    graphs, rebuilt on the next start)."""
    out = {settings.resolved_models_dir, (settings.resolved_data_dir / "cache").resolve()}
    db = _sqlite_path(settings.resolved_database_url)
    if db is not None:
        out |= {db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), db.with_name(db.name + "-journal")}
    return out


def _data_files(settings: Settings, skip: set[Path]) -> list[Path]:
    root = settings.resolved_data_dir
    if not root.is_dir():
        return []
    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if (here / d).resolve() not in skip and not d.startswith(".restore-"))
        for name in sorted(names):
            path = here / name
            if path.resolve() in skip or path.is_symlink() or not path.is_file():
                continue
            files.append(path)
    return files


def _encode(value: Any) -> Any:
    # Values SQLAlchemy returns that JSON lacks, tagged so that restore turns them back exactly.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$dec": str(value)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (tag, raw), = value.items()
        if tag == "$b64":
            return base64.b64decode(raw)
        if tag == "$dt":
            return datetime.fromisoformat(raw)
        if tag == "$date":
            return date.fromisoformat(raw)
        if tag == "$dec":
            return Decimal(raw)
    return value


def _tables(connection: sa.Connection) -> list[sa.Table]:
    """Every table of the schema in dependency order (parents first), alembic's own excepted."""
    metadata = sa.MetaData()
    metadata.reflect(bind=connection)
    return [t for t in metadata.sorted_tables if t.name != "alembic_version"]


# --- create ---------------------------------------------------------------------------------------

def create_backup(settings: Settings, target: Path) -> BackupSummary:
    target = Path(target).expanduser().resolve()
    data_dir = settings.resolved_data_dir
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} exists and is not empty: choose a new directory")
    if target == data_dir or data_dir in target.parents:
        raise BackupError(f"{target} is inside the data directory {data_dir}: back up elsewhere")
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade(engine)
        revision = current_revision(engine)
        staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
        private_dir(staging.parent)
        staging.mkdir(mode=0o700)
        (staging / "database").mkdir(mode=0o700)
        try:
            db_path = _sqlite_path(settings.resolved_database_url)
            if db_path is not None:
                kind, tables = "sqlite", _backup_sqlite(db_path, staging / "database" / "enclave.db")
            else:
                kind, tables = engine.dialect.name, _dump_tables(engine, staging / "database")
            skip = _excluded(settings) | {target, staging}
            for source in _data_files(settings, skip):
                copy = staging / "data" / source.relative_to(data_dir)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy)
            make_private(staging)  # copy2 kept the sources' modes; a backup holds everything
            files = {
                p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                for p in sorted(staging.rglob("*")) if p.is_file()
            }
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "database": {"kind": kind, "revision": revision, "tables": tables},
                "files": files,
            }
            raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
            with open_private(staging / MANIFEST, "wb") as handle:
                handle.write(raw)
            if target.exists():
                target.rmdir()
            staging.rename(target)  # the backup appears complete or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        engine.dispose()
    return BackupSummary(target, len(files), sum(f["size"] for f in files.values()), kind, revision,
                         hashlib.sha256(raw).hexdigest(), tables)


def _read_only(copy: Path) -> sqlite3.Connection:
    """A connection to a SQLite file that is only read: `immutable=1` takes no locks and never
    creates (or reads) -wal/-shm side files, which would otherwise appear next to a backup copy
    kept in WAL mode and make it differ from its manifest."""
    return sqlite3.connect(f"{copy.resolve().as_uri()}?mode=ro&immutable=1", uri=True)


def _backup_sqlite(source: Path, copy: Path) -> dict[str, int]:
    src = sqlite3.connect(str(source), timeout=30)
    dst = sqlite3.connect(str(copy))
    try:
        src.backup(dst)  # SQLite's online backup API: consistent while others read and write
        # The copy inherits the live file's WAL mode; a rollback-journal file is one self-contained
        # file that any later open leaves alone.
        dst.execute("PRAGMA journal_mode=DELETE")
        names = [r[0] for r in dst.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' AND name != 'alembic_version'")]
        return {n: dst.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0] for n in sorted(names)}
    finally:
        dst.close()
        src.close()


def _dump_tables(engine: sa.Engine, folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    # REPEATABLE READ: every table is read from the same snapshot.
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
        with connection.begin():
            for table in _tables(connection):
                order = list(table.primary_key.columns) or list(table.columns)
                count = 0
                with open(folder / f"{table.name}.jsonl", "w", encoding="utf-8") as out:
                    result = connection.execution_options(stream_results=True, yield_per=1000).execute(
                        sa.select(table).order_by(*order))
                    for row in result.mappings():
                        out.write(json.dumps({k: _encode(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
                        count += 1
                counts[table.name] = count
    return counts


# --- verify ---------------------------------------------------------------------------------------

def _stale_side_files(path: Path, files: dict) -> set[str]:
    """The -shm and empty -wal that verifying a backup of an earlier version left next to its
    WAL-mode SQLite copy. They are never read (the copy is opened immutable), so they are ignored;
    a -wal with content is not, as it would mean pages the manifest does not cover."""
    if "database/enclave.db" not in files:
        return set()
    wal = path / "database" / "enclave.db-wal"
    if wal.exists() and wal.stat().st_size:
        return set()
    return {"database/enclave.db-shm", "database/enclave.db-wal"}


def verify_backup(path: Path, expect_manifest_sha256: str | None = None) -> dict:
    """The manifest, once every file matches it; BackupError naming the first problem otherwise."""
    path = Path(path).expanduser().resolve()
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BackupError(f"{path} is not an Enclave backup (no {MANIFEST})")
    raw = manifest_path.read_bytes()
    if expect_manifest_sha256 and hashlib.sha256(raw).hexdigest() != expect_manifest_sha256.lower():
        raise BackupError("refusing to restore: the manifest's sha256 is not the one recorded when the backup was made")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupError(f"refusing to restore: {MANIFEST} is not valid JSON (damaged or tampered with)") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{path}: unknown backup format {manifest.get('format')!r} {manifest.get('format_version')!r}")
    files: dict = manifest.get("files") or {}
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(files) - _stale_side_files(path, files))
    if extra:
        raise BackupError(f"refusing to restore: {extra[0]} is in the backup but not in its manifest (tampered with?)")
    for name, meta in sorted(files.items()):
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BackupError(f"refusing to restore: unsafe path {name!r} in the manifest")
        if not file.is_file():
            raise BackupError(f"refusing to restore: {name} is missing from the backup")
        if file.stat().st_size != meta["size"] or sha256_file(file) != meta["sha256"]:
            raise BackupError(f"refusing to restore: {name} does not match its sha256 in the manifest "
                              "(the backup is damaged or was tampered with); nothing was changed")
    kind = manifest["database"]["kind"]
    if kind == "sqlite":
        con = _read_only(path / "database" / "enclave.db")
        try:
            if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise BackupError("refusing to restore: the SQLite copy fails its integrity check")
        finally:
            con.close()
    return manifest


# --- restore --------------------------------------------------------------------------------------

def restore_backup(settings: Settings, path: Path, expect_manifest_sha256: str | None = None) -> dict:
    path = Path(path).expanduser().resolve()
    manifest = verify_backup(path, expect_manifest_sha256)
    kind = manifest["database"]["kind"]
    db_path = _sqlite_path(settings.resolved_database_url)
    if (kind == "sqlite") != (db_path is not None):
        target = "SQLite" if db_path is not None else "PostgreSQL"
        raise BackupError(f"this backup holds a {kind} database and Enclave is configured for {target}: "
                          "point database_url at the same kind of database")

    data_dir = settings.resolved_data_dir
    private_dir(data_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    staging = data_dir / f".restore-{stamp}-{uuid.uuid4().hex[:6]}"
    aside = staging / "previous"
    incoming = staging / "incoming"
    try:
        # 1. Stage the files (same filesystem as the live ones, so the swap below is renames).
        source = path / "data"
        incoming.mkdir(parents=True)
        if source.is_dir():
            for entry in source.iterdir():
                if entry.is_dir():
                    shutil.copytree(entry, incoming / entry.name, copy_function=shutil.copy2)
                else:
                    shutil.copy2(entry, incoming / entry.name)
        make_private(incoming)
        # 2. The database: one transaction (PostgreSQL) or SQLite's backup API into the live file.
        if kind == "sqlite":
            _restore_sqlite(path / "database" / "enclave.db", db_path)
        else:
            _restore_tables(settings.resolved_database_url, path / "database", manifest["database"])
        # 3. Swap: whatever the data directory holds besides models, database and staging goes
        # aside, the staged entries take its place.
        keep = _excluded(settings) | {staging}
        aside.mkdir()
        for entry in list(data_dir.iterdir()):
            if entry.resolve() in keep or entry.name.startswith(".restore-"):
                continue
            entry.rename(aside / entry.name)
        for entry in list(incoming.iterdir()):
            entry.rename(data_dir / entry.name)
    except BaseException:
        # Put back anything already moved aside; the staged copies are dropped.
        if aside.is_dir():
            for entry in aside.iterdir():
                live = data_dir / entry.name
                if live.exists():
                    shutil.rmtree(live) if live.is_dir() else live.unlink()
                entry.rename(live)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _restore_sqlite(copy: Path, live: Path) -> None:
    private_dir(live.parent)
    create_private_file(live)  # 0600 from its first byte; an existing database is not opened here
    src = _read_only(copy)
    dst = sqlite3.connect(str(live), timeout=30)
    try:
        src.backup(dst)  # replaces the live database's pages in one go
    finally:
        dst.close()
        src.close()


def _restore_tables(url: str, folder: Path, database: dict) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:  # all or nothing
            for table in reversed(_tables(connection)):
                table.drop(connection)
            connection.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, database["revision"] or "head")  # the schema the dump was made with
            ordered = _tables(connection)  # parents before children
            unknown = set(database["tables"]) - {t.name for t in ordered}
            if unknown:
                raise BackupError(f"tables {sorted(unknown)} of the backup do not exist at revision {database['revision']}")
            for table in ordered:
                if table.name not in database["tables"]:
                    continue
                name, expected = table.name, database["tables"][table.name]
                batch: list[dict] = []
                count = 0
                with open(folder / f"{name}.jsonl", encoding="utf-8") as rows:
                    for line in rows:
                        batch.append({k: _decode(v) for k, v in json.loads(line).items()})
                        if len(batch) >= 1000:
                            connection.execute(table.insert(), batch)
                            count, batch = count + len(batch), []
                if batch:
                    connection.execute(table.insert(), batch)
                    count += len(batch)
                if count != expected:
                    raise BackupError(f"table {name}: {count} rows read, the manifest says {expected}")
                _reset_sequences(connection, table)
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")  # an older backup is migrated like any older database
    finally:
        engine.dispose()


def _reset_sequences(connection: sa.Connection, table: sa.Table) -> None:
    """Rows were inserted with their ids: move each serial/identity sequence past the largest."""
    if connection.dialect.name != "postgresql":
        return
    for column in table.primary_key.columns:
        if not isinstance(column.type, sa.Integer):
            continue
        sequence = connection.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                                      {"t": table.name, "c": column.name}).scalar()
        if sequence:
            connection.execute(sa.text(
                f'SELECT setval(:s, COALESCE((SELECT MAX("{column.name}") FROM "{table.name}"), 1), '
                f'(SELECT MAX("{column.name}") FROM "{table.name}") IS NOT NULL)'), {"s": sequence})
