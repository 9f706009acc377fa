"""The audit chain on SQLite and PostgreSQL: tampering of every kind is detected, concurrent writers
in several real processes keep one gap-free chain, the CLI verifies, exports and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from app.db import make_engine
from security.audit import (
    CHECKPOINTS,
    HEAD,
    RECORDS,
    AuditEvent,
    AuditLog,
    AuditSigner,
    checkpoint_payload,
    record_hash,
    verify_export,
)
from tests.conftest import REPO


def event(i: int) -> AuditEvent:
    return AuditEvent(action="search", subject=f"key:{i:012x}", key_id=f"{i:012x}", role="user", source_ip="127.0.0.1",
                      knowledge_base="default", query_sha256="ab" * 32, query_text=f"question {i} 年假",
                      chunk_ids=[i, i + 1], latency_ms=12, request_id=f"req-{i}")


@pytest.fixture
def log(database_url: str, tmp_path: Path) -> AuditLog:
    signer = AuditSigner.from_file(tmp_path / "secrets" / "audit-signing.key")
    return AuditLog(make_engine(database_url), signer, checkpoint_every=4)


def fill(log: AuditLog, n: int = 10) -> None:
    for i in range(1, n + 1):
        log.append(event(i))


def execute(log: AuditLog, *statements) -> None:
    with log.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def test_clean_chain_verifies_and_key_is_private(log: AuditLog, tmp_path: Path):
    fill(log)
    report = log.verify()
    assert report.ok, report.problems
    assert (report.records, report.first_seq, report.last_seq) == (10, 1, 10)
    assert report.checkpoints == 2 and report.last_checkpoint_seq == 8  # every 4 records
    assert (tmp_path / "secrets" / "audit-signing.key").stat().st_mode & 0o777 == 0o600
    first = next(log.records())
    assert first["prev_hash"] == "0" * 64 and first["hash"] == record_hash(first)
    assert json.loads(first["chunk_ids"]) == [1, 2] and first["query_text"] == "question 1 年假"
    cp = log.checkpoint()
    assert cp["seq"] == 10 and log.verify().last_checkpoint_seq == 10


def _flip(value: str) -> str:
    return value[:-1] + chr(ord(value[-1]) ^ 1)


@pytest.mark.parametrize("column", ["query_text", "subject", "hash", "prev_hash", "chunk_ids"])
def test_one_flipped_byte_is_detected(log: AuditLog, column: str):
    fill(log)
    with log.engine.connect() as conn:
        value = conn.execute(sa.select(RECORDS.c[column]).where(RECORDS.c.seq == 6)).scalar_one()
    execute(log, RECORDS.update().where(RECORDS.c.seq == 6).values({column: _flip(value)}))
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 6, report.problems


def test_deleted_record_is_detected(log: AuditLog):
    fill(log)
    execute(log, RECORDS.delete().where(RECORDS.c.seq == 5))
    report = log.verify()
    assert not report.ok and report.gaps == [[5, 5]] and report.first_broken_seq == 5
    assert 6 in report.broken_links


def test_deleted_tail_is_detected(log: AuditLog):
    fill(log)
    execute(log, RECORDS.delete().where(RECORDS.c.seq >= 9))  # after the checkpoint at 8: only the head knows
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 9
    # Cutting back past a checkpoint, head row adjusted too: the signed checkpoint still knows.
    last = next(r for r in log.records(7))
    execute(log, RECORDS.delete().where(RECORDS.c.seq >= 8),
            HEAD.update().where(HEAD.c.id == 1).values(seq=7, hash=last["hash"]))
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 8 and 8 in report.checkpoint_mismatches


def test_removed_head_row_is_detected_and_refuses_appends(log: AuditLog):
    from security.audit import AuditError

    fill(log, 3)
    execute(log, HEAD.delete())
    with pytest.raises(AuditError, match="head row is missing"):
        log.append(event(4))
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 1  # the (absent) head says 0 records


def test_reordered_records_are_detected(log: AuditLog):
    fill(log)
    execute(log, RECORDS.update().where(RECORDS.c.seq == 3).values(seq=-3),
            RECORDS.update().where(RECORDS.c.seq == 7).values(seq=3),
            RECORDS.update().where(RECORDS.c.seq == -3).values(seq=7))
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 3 and {3, 7} <= set(report.altered)


def test_rewritten_chain_is_caught_by_the_signed_checkpoints(log: AuditLog):
    """An attacker with database access alters record 2 and recomputes every hash and the head."""
    fill(log)
    records = list(log.records())
    records[1]["query_text"] = "nothing to see"
    prev = "0" * 64
    statements = []
    for r in records:
        r["prev_hash"] = prev
        r["hash"] = prev = record_hash(r)
        statements.append(RECORDS.update().where(RECORDS.c.seq == r["seq"]).values(prev_hash=r["prev_hash"], hash=r["hash"],
                                                                                    query_text=r["query_text"]))
    statements.append(HEAD.update().where(HEAD.c.id == 1).values(seq=10, hash=prev))
    execute(log, *statements)
    report = log.verify()
    assert not report.ok and report.altered == [] and report.broken_links == []  # a consistent chain...
    assert report.checkpoint_mismatches == [4, 8]  # ...that the signatures disown


def test_forged_checkpoints_are_detected(log: AuditLog):
    fill(log)
    other = AuditSigner(Ed25519PrivateKey.generate())
    last = list(log.records())[-1]
    time = "2026-12-01T00:00:00.000000+00:00"
    # Signed with another key but claiming the real key id.
    forged = {"seq": 10, "hash": last["hash"], "time": time, "key_id": log.signer.key_id,
              "signature": other.sign(checkpoint_payload(10, last["hash"], time, log.signer.key_id))}
    execute(log, CHECKPOINTS.insert().values(**forged))
    report = log.verify()
    assert not report.ok and report.bad_signatures == [10]
    execute(log, CHECKPOINTS.delete().where(CHECKPOINTS.c.seq == 10))
    assert log.verify().ok
    # A real checkpoint with an altered field.
    execute(log, CHECKPOINTS.update().where(CHECKPOINTS.c.seq == 4).values(hash=list(log.records())[4]["hash"]))
    report = log.verify()
    assert not report.ok and report.bad_signatures == [4] and report.first_broken_seq == 4


WRITER = textwrap.dedent("""
    import sys
    from app.db import make_engine
    from security.audit import AuditEvent, AuditLog, AuditSigner
    url, key, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    log = AuditLog(make_engine(url), AuditSigner.from_file(key), checkpoint_every=7)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(n):
        log.append(AuditEvent(action="search", subject=f"worker-{worker}", request_id=f"{worker}-{i}"))
""")


def _start_writers(database_url: str, tmp_path: Path, workers: int, per_worker: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    key = str(tmp_path / "secrets" / "audit-signing.key")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, database_url, key, str(w), str(per_worker)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for w in range(workers)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=600) == 0


@pytest.mark.slow
def test_verification_while_others_append_sees_a_clean_chain(log: AuditLog, database_url: str, tmp_path: Path):
    """The admin page verifies the chain while the requests around it are being audited: a
    verification that overlaps appends must not report the chain head running ahead of the records."""
    fill(log, 3)
    procs = _start_writers(database_url, tmp_path, workers=2, per_worker=150)
    verified = []
    while any(p.poll() is None for p in procs):
        report = log.verify()
        assert report.ok, report.problems
        status = log.status()
        assert status["verified"] and status["last_seq"] == status["records"], status
        verified.append(report.last_seq)
    _wait(procs)
    assert len(set(verified)) > 1  # the verifications really overlapped the appends
    report = log.verify()
    assert report.ok and report.last_seq == 303, report.problems


def test_records_left_beyond_the_head_are_detected(log: AuditLog):
    fill(log, 6)
    last = next(r for r in log.records(5))
    execute(log, HEAD.update().where(HEAD.c.id == 1).values(seq=5, hash=last["hash"]))  # the head set back by one
    report = log.verify()
    assert not report.ok and report.first_broken_seq == 6, report.problems
    assert any("beyond the chain head" in p for p in report.problems)


@pytest.mark.slow
def test_concurrent_writers_in_several_processes_keep_one_chain(log: AuditLog, database_url: str, tmp_path: Path):
    workers, per_worker = 4, 40
    _wait(_start_writers(database_url, tmp_path, workers, per_worker))
    report = log.verify()
    assert report.ok, report.problems
    total = workers * per_worker
    assert (report.records, report.last_seq) == (total, total)
    records = list(log.records())
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    assert {r["request_id"] for r in records} == {f"{w}-{i}" for w in range(workers) for i in range(per_worker)}
    assert len({r["subject"] for r in records[: total // 2]}) > 1  # they really interleaved
    assert report.checkpoints == total // 7


def test_cli_verify_export_checkpoint(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from app.cli.main import app
    from app.container import Container
    from app.settings import Settings

    for key in ("ENCLAVE_CONFIG", "ENCLAVE_DATA_DIR", "ENCLAVE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ENCLAVE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("ENCLAVE_DATABASE_URL", database_url)
    log = Container(Settings()).audit_log
    fill(log, 5)
    runner = CliRunner()

    ok = runner.invoke(app, ["audit", "verify"])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    made = runner.invoke(app, ["audit", "checkpoint"])
    assert made.exit_code == 0 and "seq 5" in made.output, made.output
    out = tmp_path / "audit.jsonl"
    exported = runner.invoke(app, ["audit", "export", "--since", "3", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["public_key", "record", "record", "record", "checkpoint"]
    assert [x["seq"] for x in lines if x["type"] == "record"] == [3, 4, 5]
    pem = tmp_path / "audit.pub"
    pem.write_text(lines[0]["pem"])
    assert runner.invoke(app, ["audit", "verify", "--file", str(out), "--public-key", str(pem)]).exit_code == 0
    everything = runner.invoke(app, ["audit", "export", "--since", "2000-01-01T00:00:00Z"])
    assert everything.exit_code == 0 and everything.output.count('"type":"record"') == 6  # + the first export's own record

    # An altered export line, and a forged database record: both fail with a non-zero exit code.
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(out.read_text().replace('"question 4 年假"', '"question 9 年假"'))
    assert not verify_export(tampered.read_text().splitlines()).ok
    bad = runner.invoke(app, ["audit", "verify", "--file", str(tampered)])
    assert bad.exit_code == 1 and "4" in bad.output
    execute(log, RECORDS.update().where(RECORDS.c.seq == 2).values(action="chat"))
    broken = runner.invoke(app, ["audit", "verify", "--json"])
    assert broken.exit_code == 1 and json.loads(broken.output)["first_broken_seq"] == 2
