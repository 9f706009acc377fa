"""Audit chain throughput: appends per second (1 and 4 writer processes) and verification rate, on
SQLite and, when a URL is given, PostgreSQL.

    python bench/audit.py [--records 2000] [--postgres postgresql+psycopg://...]

Each database gets a fresh schema (SQLite: a temporary file; PostgreSQL: a private schema dropped
afterwards). Figures are records per second; the load average is printed next to them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

from app.db import make_engine, upgrade  # noqa: E402
from security.audit import AuditEvent, AuditLog, AuditSigner  # noqa: E402


def event(i: int) -> AuditEvent:
    return AuditEvent(action="chat", subject="key:abcdefabcdef", key_id="abcdefabcdef", role="user",
                      source_ip="10.0.0.7", knowledge_base="default", query_sha256="ab" * 32,
                      query_text=f"How many days of annual leave do I get? ({i})", chunk_ids=[i, i + 1, i + 2, i + 3],
                      model="smollm2-135m-instruct", answer_sha256="cd" * 32, prompt_tokens=900, completion_tokens=120,
                      latency_ms=2300, request_id=uuid.uuid4().hex)


def _writer(url: str, key: str, n: int, start: mp.Event) -> None:
    log = AuditLog(make_engine(url), AuditSigner.from_file(Path(key)), checkpoint_every=1000)
    start.wait()
    for i in range(n):
        log.append(event(i))


def run(url: str, key: Path, records: int) -> list[tuple[str, float]]:
    upgrade(make_engine(url))
    log = AuditLog(make_engine(url), AuditSigner.from_file(key), checkpoint_every=1000)
    results = []
    t = time.perf_counter()
    for i in range(records):
        log.append(event(i))
    results.append(("append, 1 process", records / (time.perf_counter() - t)))
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, str(key), records // 4, start)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(3)  # let them import and connect
    t = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    results.append(("append, 4 processes (total)", (records // 4) * 4 / (time.perf_counter() - t)))
    t = time.perf_counter()
    report = log.verify()
    assert report.ok, report.problems
    results.append(("verify", report.records / (time.perf_counter() - t)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--postgres", default=os.environ.get("ENCLAVE_TEST_DATABASE_URL"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "audit-signing.key"
        targets = [("sqlite", f"sqlite:///{tmp}/bench.db", None)]
        if args.postgres:
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            base = sa.engine.make_url(args.postgres)
            admin = sa.create_engine(base)
            with admin.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            url = base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
            targets.append(("postgresql", url, (admin, schema)))
        print(f"load average before: {os.getloadavg()[0]:.2f}; {args.records} records per phase")
        print(f"{'database':<11} {'phase':<30} {'records/s':>10}")
        for name, url, cleanup in targets:
            try:
                for phase, rate in run(url, key, args.records):
                    print(f"{name:<11} {phase:<30} {rate:>10.0f}")
            finally:
                if cleanup:
                    admin, schema = cleanup
                    with admin.begin() as conn:
                        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
