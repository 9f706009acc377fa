"""Tamper-evident audit log: a hash chain of records in SQL with Ed25519-signed checkpoints.

Record ``n`` stores ``prev_hash`` (the hash of record ``n-1``; 64 zeros for the first) and
``hash = sha256(canonical_json(every column but hash))``. Canonical JSON is ``json.dumps`` with
sorted keys, no whitespace and UTF-8 (``ensure_ascii=False``); for the values used here (strings,
integers, null) it is byte-identical to RFC 8785, so any JCS implementation can re-check an export.

* Changing any byte of a stored record breaks its hash; deleting or reordering records breaks the
  sequence (gap-free, unique numbers) and the links; cutting records off the end disagrees with the
  chain-head row and with the last checkpoint.
* Someone who can write the database could recompute the whole chain. Checkpoints answer that: every
  ``checkpoint_every`` records (and on demand) the (seq, hash) of the newest record is signed with an
  Ed25519 key that lives outside the database, and can be copied off the box (``checkpoint_file``, the
  export). A rewritten chain no longer matches the signed hashes.

Concurrency: all writers, in any number of processes, serialise on the chain head. PostgreSQL:
``SELECT ... FOR UPDATE`` of the head row inside the inserting transaction. SQLite: the transaction
starts with ``BEGIN IMMEDIATE`` (the database write lock is taken before the head is read). The
sequence number, the record and the new head commit together or not at all, so there is one chain
and no gap.

Hand-written because no maintained Python library keeps a verifiable hash chain in a shared SQL
database (the transparency-log projects are servers of their own: Trillian, Rekor); the primitives
come from ``hashlib`` and ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from security.tables import AuditCheckpointRow, AuditHeadRow, AuditRecordRow

GENESIS = "0" * 64
CHECKPOINT_TYPE = "enclave.audit.checkpoint.v1"
RECORDS = AuditRecordRow.__table__
HEAD = AuditHeadRow.__table__
CHECKPOINTS = AuditCheckpointRow.__table__
_INSERT_RECORD = RECORDS.insert()
_MOVE_HEAD = HEAD.update().where(HEAD.c.id == 1).values(seq=sa.bindparam("new_seq"), hash=sa.bindparam("new_hash"))
# The columns a record is hashed over, in table order (``hash`` itself excluded).
FIELDS = tuple(c.name for c in RECORDS.columns if c.name != "hash")
MAX_REPORTED = 50  # problems listed per kind in a verification report


class AuditError(Exception):
    """The audit log could not be written or read (the caller must fail closed)."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def record_hash(record: dict[str, Any]) -> str:
    return sha256_hex(canonical_json({name: record.get(name) for name in FIELDS}))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class AuditEvent:
    """What happened; the log adds seq, time and the hashes."""

    action: str  # e.g. chat, chat.start, search, embeddings, document.upload, key.create, auth.failure
    status: str = "ok"  # ok | started | denied | failed | error | cancelled
    request_id: str | None = None
    subject: str | None = None
    key_id: str | None = None  # the public key id, never the key
    role: str | None = None
    source_ip: str | None = None
    knowledge_base: str | None = None
    query_sha256: str | None = None
    query_text: str | None = None  # already redacted or dropped by the caller's policy
    chunk_ids: list[int] = field(default_factory=list)
    model: str | None = None
    adapter: str | None = None
    answer_sha256: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: int | None = None
    detail: str | None = None  # short, non-secret context: a document id, a key id, an error code


# --- signing key ----------------------------------------------------------------------------------


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError("the public key is not an Ed25519 key")
    return key


class AuditSigner:
    """The checkpoint signing key: an Ed25519 private key in a PEM file, created with mode 0600."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = public_key_id(self.public_key)

    @classmethod
    def from_file(cls, path: Path, create: bool = True) -> "AuditSigner":
        path = Path(path)
        if not path.exists():
            if not create:
                raise AuditError(f"no audit signing key at {path}")
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            # Written completely under a private name, then linked into place: a process starting at
            # the same moment either sees no key or the whole key, and the first link wins.
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # another process created it first: use theirs
            finally:
                tmp.unlink(missing_ok=True)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload)).decode()


def checkpoint_payload(seq: int, record_hash_: str, time: str, key_id: str) -> bytes:
    return canonical_json({"type": CHECKPOINT_TYPE, "seq": seq, "hash": record_hash_, "time": time, "key_id": key_id})


def checkpoint_valid(cp: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> bool:
    key = keys.get(cp.get("key_id"))
    if key is None:
        return False
    try:
        key.verify(base64.b64decode(cp["signature"], validate=True),
                   checkpoint_payload(cp["seq"], cp["hash"], cp["time"], cp["key_id"]))
        return True
    except (InvalidSignature, ValueError, TypeError, KeyError):
        return False


# --- verification ---------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    ok: bool = True
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_broken_seq: int | None = None
    altered: list[int] = field(default_factory=list)  # records whose hash does not match their content
    broken_links: list[int] = field(default_factory=list)  # records whose prev_hash is not the previous hash
    gaps: list[list[int]] = field(default_factory=list)  # [first missing, last missing]
    bad_signatures: list[int] = field(default_factory=list)  # checkpoint seqs
    checkpoint_mismatches: list[int] = field(default_factory=list)  # signed hash != stored record hash
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    last_checkpoint_time: str | None = None
    problems: list[str] = field(default_factory=list)

    def _problem(self, seq: int | None, text: str) -> None:
        self.ok = False
        if seq is not None and (self.first_broken_seq is None or seq < self.first_broken_seq):
            self.first_broken_seq = seq
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_chain(
    records: Iterable[dict[str, Any]],
    checkpoints: Iterable[dict[str, Any]],
    public_keys: dict[str, Ed25519PublicKey],
    head: dict[str, Any] | None = None,
    anchored: bool = True,
) -> VerifyReport:
    """Check records (in seq order), checkpoints and, for a database, the chain head.

    ``anchored``: the records start at the beginning of the chain (seq 1, prev_hash = zeros). An
    export made ``--since`` a later point is checked from its first record's prev_hash on.
    """
    report = VerifyReport()
    cps = sorted(checkpoints, key=lambda c: (c["seq"], c.get("id") or 0))
    report.checkpoints = len(cps)
    signed_at: dict[int, list[dict[str, Any]]] = {}
    for cp in cps:
        if checkpoint_valid(cp, public_keys):
            signed_at.setdefault(cp["seq"], []).append(cp)
            report.last_checkpoint_seq, report.last_checkpoint_time = cp["seq"], cp["time"]
        else:
            report.bad_signatures.append(cp["seq"])
            report._problem(cp["seq"], f"checkpoint at seq {cp['seq']}: bad signature or unknown key {cp.get('key_id')!r}")

    expected_seq: int | None = 1 if anchored else None
    prev_hash: str | None = GENESIS if anchored else None
    last: dict[str, Any] | None = None
    for record in records:
        seq = record["seq"]
        report.records += 1
        if report.first_seq is None:
            report.first_seq = seq
        if expected_seq is not None and seq != expected_seq:
            if seq > expected_seq:
                report.gaps.append([expected_seq, seq - 1])
                report._problem(expected_seq, f"records {expected_seq}..{seq - 1} are missing")
            else:
                report._problem(seq, f"record {seq} is out of order or duplicated")
        if record_hash(record) != record["hash"]:
            report.altered.append(seq)
            report._problem(seq, f"record {seq}: content does not match its hash (altered)")
        if prev_hash is not None and record["prev_hash"] != prev_hash:
            report.broken_links.append(seq)
            report._problem(seq, f"record {seq}: prev_hash is not the hash of the record before it")
        for cp in signed_at.get(seq, ()):
            if cp["hash"] != record["hash"]:
                report.checkpoint_mismatches.append(seq)
                report._problem(seq, f"record {seq} differs from the signed checkpoint (chain rewritten)")
        expected_seq, prev_hash, last = seq + 1, record["hash"], record
    report.last_seq = last["seq"] if last else None

    last_seq = report.last_seq or 0
    for seq in signed_at:
        if seq > last_seq:
            report.checkpoint_mismatches.append(seq)
            report._problem(last_seq + 1, f"a signed checkpoint covers seq {seq} but the chain ends at {last_seq} "
                                          "(records removed from the end)")
    if head is not None:
        if head["seq"] != last_seq or (last is not None and head["hash"] != last["hash"]):
            report._problem(min(head["seq"], last_seq) + 1,
                            f"the chain head says seq {head['seq']} but the records end at {last_seq}")
    for name in ("altered", "broken_links", "bad_signatures", "checkpoint_mismatches"):
        setattr(report, name, getattr(report, name)[:MAX_REPORTED])
    report.gaps = report.gaps[:MAX_REPORTED]
    return report


# --- the log --------------------------------------------------------------------------------------


@dataclass
class AppendResult:
    seq: int
    hash: str
    checkpoint: dict[str, Any] | None = None


class AuditLog:
    def __init__(
        self,
        engine: Engine,
        signer: AuditSigner,
        *,
        checkpoint_every: int = 1000,
        checkpoint_file: Path | None = None,
        trusted_public_keys: Iterable[Ed25519PublicKey] = (),
    ):
        self.engine = engine
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_file = Path(checkpoint_file) if checkpoint_file else None
        self.public_keys = {signer.key_id: signer.public_key}
        for key in trusted_public_keys:  # earlier signing keys, after a rotation
            self.public_keys[public_key_id(key)] = key
        self._sqlite = engine.dialect.name == "sqlite"
        self._writer = self._sqlite_writer(engine) if self._sqlite else engine

    @staticmethod
    def _sqlite_writer(engine: Engine) -> Engine:
        """A second engine on the same SQLite file whose transactions start with BEGIN IMMEDIATE
        (SQLAlchemy's documented recipe: the driver's own deferred BEGIN is switched off)."""
        writer = sa.create_engine(engine.url, connect_args={"check_same_thread": False, "timeout": 30},
                                  hide_parameters=True)  # query text and answers are bound values

        @event.listens_for(writer, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(writer, "begin")
        def _begin(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return writer

    # writing ---------------------------------------------------------------------------------

    def append(self, event_: AuditEvent) -> AppendResult:
        values = asdict(event_)
        values["chunk_ids"] = canonical_json([int(c) for c in values["chunk_ids"]]).decode()
        try:
            with self._writer.begin() as conn:
                seq, prev = self._lock_head(conn)
                record = {**values, "seq": seq + 1, "time": _now(), "prev_hash": prev}
                record["hash"] = record_hash(record)
                # Statements with bound parameters, not values baked in: SQLAlchemy compiles each once
                # (values() made it build a new statement and its cache key on every append: a third of
                # an append's CPU time).
                conn.execute(_INSERT_RECORD, record)
                conn.execute(_MOVE_HEAD, {"new_seq": record["seq"], "new_hash": record["hash"]})
                checkpoint = None
                if self.checkpoint_every and record["seq"] % self.checkpoint_every == 0:
                    checkpoint = self._insert_checkpoint(conn, record["seq"], record["hash"])
        except AuditError:
            raise
        except Exception as exc:  # database down, disk full, lock timeout: the caller fails closed
            raise AuditError(f"audit write failed: {type(exc).__name__}") from exc
        if checkpoint is not None:
            self._copy_checkpoint(checkpoint)
        return AppendResult(record["seq"], record["hash"], checkpoint)

    def _lock_head(self, conn) -> tuple[int, str]:
        query = sa.select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)
        if not self._sqlite:
            query = query.with_for_update()  # SQLite: BEGIN IMMEDIATE already holds the write lock
        row = conn.execute(query).first()
        if row is None:
            # First append ever: create the head of the empty chain (a restore or a concurrent first
            # writer may have made it already: insert-or-ignore - which waits for a concurrent
            # inserter - then lock it). Only then judge: a head at the genesis next to existing
            # records means someone removed it; a concurrent first writer's head has moved on.
            dialect = postgresql if not self._sqlite else sqlite
            conn.execute(dialect.insert(HEAD).values(id=1, seq=0, hash=GENESIS).on_conflict_do_nothing())
            row = conn.execute(query).first()
            if int(row.seq) == 0 and conn.execute(sa.select(RECORDS.c.seq).limit(1)).first() is not None:
                raise AuditError("the audit chain head row is missing while records exist (tampered with)")
        return int(row.seq), row.hash

    def _insert_checkpoint(self, conn, seq: int, hash_: str) -> dict[str, Any]:
        time = _now()
        cp = {"seq": seq, "hash": hash_, "time": time, "key_id": self.signer.key_id,
              "signature": self.signer.sign(checkpoint_payload(seq, hash_, time, self.signer.key_id))}
        cp["id"] = conn.execute(CHECKPOINTS.insert().values(**cp)).inserted_primary_key[0]
        return cp

    def _copy_checkpoint(self, cp: dict[str, Any]) -> None:
        if self.checkpoint_file is None:
            return
        self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.checkpoint_file, "a", encoding="utf-8") as handle:
            handle.write(canonical_json({"type": "checkpoint", **cp}).decode() + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head now (None while the chain is empty)."""
        with self._writer.begin() as conn:
            seq, hash_ = self._lock_head(conn)
            if seq == 0:
                return None
            cp = self._insert_checkpoint(conn, seq, hash_)
        self._copy_checkpoint(cp)
        return cp

    # reading ---------------------------------------------------------------------------------

    def head(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(HEAD.c.seq, HEAD.c.hash).where(HEAD.c.id == 1)).first()
        return {"seq": int(row.seq), "hash": row.hash} if row else None

    def records(self, since_seq: int = 1, batch: int = 2000, until_seq: int | None = None) -> Iterator[dict[str, Any]]:
        """Records in seq order, read in batches (bounded memory for long chains)."""
        cursor = since_seq - 1
        while True:
            query = sa.select(RECORDS).where(RECORDS.c.seq > cursor)
            if until_seq is not None:
                query = query.where(RECORDS.c.seq <= until_seq)
            with self.engine.connect() as conn:
                rows = conn.execute(query.order_by(RECORDS.c.seq).limit(batch)).mappings().all()
            if not rows:
                return
            for row in rows:
                yield dict(row)
            cursor = rows[-1]["seq"]

    def first_seq_since(self, when: datetime) -> int:
        """The first seq recorded at or after ``when`` (the next seq when none is)."""
        text = when.astimezone(timezone.utc).isoformat(timespec="microseconds")
        with self.engine.connect() as conn:
            seq = conn.execute(sa.select(sa.func.min(RECORDS.c.seq)).where(RECORDS.c.time >= text)).scalar()
            if seq is None:
                seq = (conn.execute(sa.select(sa.func.max(RECORDS.c.seq))).scalar() or 0) + 1
        return int(seq)

    def checkpoints(self, since_seq: int = 0) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(CHECKPOINTS).where(CHECKPOINTS.c.seq >= since_seq).order_by(CHECKPOINTS.c.seq, CHECKPOINTS.c.id)
            ).mappings().all()
        return [dict(r) for r in rows]

    def verify(self) -> VerifyReport:
        """Verify the chain up to the head as read first, while appends may go on.

        The records are read in several batches, so the reading is not one snapshot: an append
        between reading the records and reading the head would look like a head pointing past the
        records. An append commits its record and the head together, so every record up to a head
        once read is committed: that head bounds the records and checkpoints verified. What lies
        beyond it is checked afterwards against the head as it is then (``_beyond_head``).
        """
        return self._verify()[0]

    def _verify(self) -> tuple[VerifyReport, dict[str, Any]]:
        head = self.head() or {"seq": 0, "hash": GENESIS}
        checkpoints = [cp for cp in self.checkpoints() if cp["seq"] <= head["seq"]]
        report = verify_chain(self.records(until_seq=head["seq"]), checkpoints, self.public_keys, head=head)
        self._beyond_head(report)
        return report, head

    def _beyond_head(self, report: VerifyReport) -> None:
        """Records or checkpoints past the current head were not written by ``append`` (which moves
        the head in the same transaction): records left behind when the head was set back, say.
        The highest seqs are read before the head, so a concurrent append cannot trip this."""
        with self.engine.connect() as conn:
            last_record = conn.execute(sa.select(sa.func.max(RECORDS.c.seq))).scalar() or 0
            last_checkpoint = conn.execute(sa.select(sa.func.max(CHECKPOINTS.c.seq))).scalar() or 0
        head = self.head() or {"seq": 0, "hash": GENESIS}
        if last_record > head["seq"]:
            report._problem(head["seq"] + 1, f"records up to seq {last_record} lie beyond the chain head at {head['seq']}")
        if last_checkpoint > head["seq"]:
            report.checkpoint_mismatches.append(last_checkpoint)
            report._problem(head["seq"] + 1, f"a signed checkpoint covers seq {last_checkpoint} but the chain head "
                                             f"is at {head['seq']} (records removed from the end)")

    def status(self) -> dict[str, Any]:
        report, head = self._verify()
        return {
            "verified": report.ok, "records": report.records, "last_seq": head["seq"],
            "first_broken_seq": report.first_broken_seq, "problems": report.problems[:5],
            "checkpoints": report.checkpoints, "last_checkpoint_seq": report.last_checkpoint_seq,
            "last_checkpoint_time": report.last_checkpoint_time, "checkpoint_every": self.checkpoint_every,
            "signing_key_id": self.signer.key_id, "head_hash": head["hash"],
        }

    # export ----------------------------------------------------------------------------------

    def export(self, since_seq: int = 1) -> Iterator[dict[str, Any]]:
        """JSON lines: the public key, the records from ``since_seq``, the checkpoints that cover them."""
        for key_id, key in self.public_keys.items():
            yield {"type": "public_key", "algorithm": "Ed25519", "key_id": key_id, "pem": public_key_pem(key)}
        for record in self.records(since_seq):
            yield {"type": "record", **record}
        for cp in self.checkpoints(since_seq):
            yield {"type": "checkpoint", **cp}


def verify_export(lines: Iterable[str], public_keys: Iterable[Ed25519PublicKey] | None = None) -> VerifyReport:
    """Verify an export off the box. ``public_keys``: keys obtained independently (recommended);
    without them the keys inside the export are used, which proves integrity but not origin."""
    records, checkpoints, embedded = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            kind = item.pop("type")
        except (ValueError, KeyError, AttributeError):
            raise AuditError(f"line {number}: not an audit export line") from None
        if kind == "record":
            records.append(item)
        elif kind == "checkpoint":
            checkpoints.append(item)
        elif kind == "public_key":
            key = load_public_key(item["pem"])
            embedded[public_key_id(key)] = key
    keys = {public_key_id(k): k for k in public_keys} if public_keys is not None else embedded
    records.sort(key=lambda r: r["seq"])
    anchored = bool(records) and records[0]["seq"] == 1
    return verify_chain(records, checkpoints, keys, anchored=anchored or not records)
