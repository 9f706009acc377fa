"""`ingest reindex` after a chunker change: explicit (ingest run and search only warn), complete, and
resumable after an interruption; against real SQLite and PostgreSQL, the real embedder and FAISS."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from app.db import make_engine
from ingest.chunking import Chunker
from ingest.loaders import load_document
from ingest.pipeline import IngestPipeline, NoProgress
from ingest.reindex import reindex, stale_documents
from retrieval.retriever import Retriever
from retrieval.store import KnowledgeBaseStore
from retrieval.tables import ChunkRow, DocumentRow
from security.principal import Principal
from tests.conftest import REPO, SAMPLES, MemoEmbedder
from tests.test_ingest_pipeline import assert_consistent

OLD = Chunker(400, 80, contextual_headers=False)
NEW = Chunker(400, 80, contextual_headers=True)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    target = tmp_path / "docs"
    shutil.copytree(SAMPLES, target)
    return target


def make_pipeline(database_url: str, tmp_path: Path, embedder: MemoEmbedder, chunker: Chunker) -> IngestPipeline:
    store = KnowledgeBaseStore(
        make_engine(database_url), tmp_path / "indexes", embedder.name, embedder.dimension,
        index_version=f"{embedder.name}|{chunker.version}", heading_weight=1.0,
    )
    return IngestPipeline(store, embedder, chunker, default_groups=["everyone"], batch_files=3)


def stored_chunks(store: KnowledgeBaseStore, kb: str) -> dict[str, list[tuple[str, str | None, bytes]]]:
    with Session(store.engine) as session:
        docs = {d.id: d.source for d in session.exec(select(DocumentRow).where(DocumentRow.kb == kb))}
        rows = session.exec(select(ChunkRow).where(ChunkRow.kb == kb).order_by(ChunkRow.document_id, ChunkRow.ordinal)).all()
        out: dict[str, list] = {}
        for row in rows:
            out.setdefault(docs[row.document_id], []).append((row.text, row.heading, row.embedding))
    return out


def expected_chunks(corpus: Path, chunker: Chunker) -> dict[str, list[tuple[str, str | None]]]:
    expected = {}
    for path in sorted(p for p in corpus.rglob("*") if p.is_file() and not p.name.startswith(".")):
        chunks = chunker.split(load_document(path))
        expected[path.relative_to(corpus).as_posix()] = [(c.text, c.heading_path or c.heading) for c in chunks]
    return expected


class Interrupt(BaseException):
    """Stands for Ctrl-C (KeyboardInterrupt) arriving between two batches."""


class StopAfter(NoProgress):
    def __init__(self, files: int):
        self.left = files

    def advance(self, files: int = 0, chunks: int = 0) -> None:
        self.left -= files
        if self.left <= 0:
            raise Interrupt()


def test_chunker_change_is_explicit_and_reindex_resumes(database_url: str, tmp_path: Path, memo_embedder: MemoEmbedder, corpus: Path, caplog):
    old = make_pipeline(database_url, tmp_path, memo_embedder, OLD)
    first = old.run(corpus, "kb")
    assert first.failed == 0, first.failures
    documents = len(old.store.documents("kb"))
    assert old.store.stale_documents("kb") == 0

    # The operator switches contextual headers on: nothing is rebuilt behind their back.
    new = make_pipeline(database_url, tmp_path, memo_embedder, NEW)
    assert new.store.stale_documents("kb") == documents
    before = stored_chunks(new.store, "kb")
    again = new.run(corpus, "kb")
    assert (again.added, again.updated, again.chunks) == (0, 0, 0)
    assert stored_chunks(new.store, "kb") == before
    with caplog.at_level(logging.WARNING, logger="retrieval.retriever"):
        retriever = Retriever(new.store, memo_embedder)
        assert retriever.search("annual leave days", "kb", Principal("t", "admin", ()), top_k=3)
    assert "ingest reindex --kb kb" in caplog.text

    # Reindex, interrupted after the first batch: the finished batch is committed with the new
    # version, the rest keeps the old chunks untouched.
    with pytest.raises(Interrupt):
        reindex(new, "kb", progress=StopAfter(3))
    done = documents - new.store.stale_documents("kb")
    assert 0 < done < documents
    partial = stored_chunks(new.store, "kb")
    for doc in stale_documents(new, "kb"):
        assert partial[doc.source] == before[doc.source]

    # Resumed: only the stale documents are processed, and the result is a clean build's.
    resumed = reindex(new, "kb")
    assert resumed.failed == 0, resumed.failures
    assert resumed.updated == documents - done
    assert new.store.stale_documents("kb") == 0
    stored = stored_chunks(new.store, "kb")
    assert {s: [(t, h) for t, h, _ in rows] for s, rows in stored.items()} == expected_chunks(corpus, NEW)
    assert_consistent(new.store, "kb")
    # The vectors are those of the embedded text: contextual header, then the chunk.
    docs = {d.source: d for d in new.store.documents("kb")}
    source = "leave-policy.md"
    text, heading, blob = stored[source][1]
    wanted = memo_embedder.embed_passages([NEW.embedding_text(docs[source].title, heading, text)])[0]
    np.testing.assert_allclose(np.frombuffer(blob, dtype=np.float32), wanted, atol=1e-5)
    assert heading and heading != text

    # Nothing left to do.
    assert reindex(new, "kb").updated == 0


def test_reindex_keeps_documents_whose_file_is_gone(database_url: str, tmp_path: Path, memo_embedder: MemoEmbedder, corpus: Path):
    make_pipeline(database_url, tmp_path, memo_embedder, OLD).run(corpus, "kb")
    (corpus / "leave-policy.md").unlink()
    new = make_pipeline(database_url, tmp_path, memo_embedder, NEW)
    before = stored_chunks(new.store, "kb")["leave-policy.md"]
    report = reindex(new, "kb")
    assert report.failed == 1 and "gone" in report.failures[0].reason
    assert stored_chunks(new.store, "kb")["leave-policy.md"] == before
    assert new.store.stale_documents("kb") == 1


def test_embedder_change_needs_reindex(database_url: str, tmp_path: Path, memo_embedder: MemoEmbedder, corpus: Path):
    make_pipeline(database_url, tmp_path, memo_embedder, NEW).run(corpus, "kb")
    # The same weights under another registered name stand for another embedder.
    other = MemoEmbedder(memo_embedder)
    other.name = "other-embedder"
    switched = make_pipeline(database_url, tmp_path, other, NEW)
    with pytest.raises(Exception, match="reindex|re-ingest"):
        switched.run(corpus, "kb")  # ingest refuses to mix embedders
    report = reindex(switched, "kb")
    assert report.failed == 0 and report.updated == len(switched.store.documents("kb"))
    assert switched.store.get_kb("kb").embedder == "other-embedder"
    assert switched.store.stale_documents("kb") == 0
    assert_consistent(switched.store, "kb")


@pytest.mark.slow
def test_reindex_cli_resumes_after_sigkill(database_url: str, tmp_path: Path, models_dir: Path, corpus: Path):
    """The real CLI, killed with SIGKILL mid-run, then run again: every document is rebuilt once."""
    for i in range(30):  # enough batches to land a kill inside the run
        shutil.copy(corpus / "leave-policy.md", corpus / f"copy-{i:02d}.md")
    env = {
        **os.environ,
        "ENCLAVE_DATA_DIR": str(tmp_path / "var"),
        "ENCLAVE_DATABASE_URL": database_url,
        "ENCLAVE_MODELS_DIR": str(models_dir),
        "ENCLAVE_INGEST__BATCH_FILES": "2",
        "ENCLAVE_CHUNKING__CONTEXTUAL_HEADERS": "false",
    }

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "app.cli.ingest_cli", *args, "--json"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    out, err = cli("run", str(corpus)).communicate(timeout=600)
    assert json.loads(out)["failed"] == 0, err
    env["ENCLAVE_CHUNKING__CONTEXTUAL_HEADERS"] = "true"
    engine = sa.create_engine(database_url)

    def stale() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM kb_document WHERE index_version IS NULL OR index_version NOT LIKE '%/headers'"
            )).scalar_one()

    total = stale()
    proc = cli("reindex")
    while stale() == total and proc.poll() is None:
        time.sleep(0.05)  # the first batch committed ...
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)  # ... then die in the middle of the run
    proc.communicate()
    assert 0 < stale() < total, "the run ended before it could be interrupted"

    out, err = cli("reindex").communicate(timeout=600)
    report = json.loads(out)
    assert report["failed"] == 0, err
    assert stale() == 0
    assert 0 < report["updated"] < total  # only what the killed run had not finished
    with engine.connect() as conn:
        pairs = conn.execute(sa.text("SELECT document_id, ordinal FROM kb_chunk")).all()
    assert len(pairs) == len(set(pairs))  # no chunk twice
