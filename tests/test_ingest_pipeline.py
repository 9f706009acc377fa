"""Incremental ingestion against real SQLite and PostgreSQL, the real embedder and real FAISS files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

from app.db import make_engine
from ingest.chunking import Chunker
from ingest.pipeline import IngestPipeline
from retrieval.retriever import Retriever
from security.principal import Principal
from retrieval.store import KnowledgeBaseError, KnowledgeBaseStore
from retrieval.tables import ChunkRow, DocumentRow
from tests.conftest import SAMPLES, MemoEmbedder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    target = tmp_path / "docs"
    shutil.copytree(SAMPLES, target)
    return target


@pytest.fixture
def counting(memo_embedder: MemoEmbedder) -> MemoEmbedder:
    return memo_embedder


@pytest.fixture
def store(database_url: str, tmp_path: Path, counting: MemoEmbedder) -> KnowledgeBaseStore:
    return KnowledgeBaseStore(make_engine(database_url), tmp_path / "indexes", counting.name, counting.dimension)


@pytest.fixture
def pipeline(store: KnowledgeBaseStore, counting: MemoEmbedder) -> IngestPipeline:
    return IngestPipeline(store, counting, Chunker(400, 80), default_groups=["everyone"], batch_files=3)


def assert_consistent(store: KnowledgeBaseStore, kb: str) -> None:
    """Published index == chunk rows; no duplicate chunks; document chunk counts agree."""
    db_ids = store.chunk_ids(kb)
    index, lexical, manifest = store.directory(kb).load(store.dimension)
    assert manifest is not None
    assert np.array_equal(np.sort(index.ids()), db_ids)
    assert np.array_equal(np.sort(lexical.ids()), db_ids)
    with Session(store.engine) as session:
        pairs = session.exec(select(ChunkRow.document_id, ChunkRow.ordinal).where(ChunkRow.kb == kb)).all()
        assert len(pairs) == len(set(pairs))
        for doc in session.exec(select(DocumentRow).where(DocumentRow.kb == kb)):
            ordinals = sorted(o for d, o in pairs if d == doc.id)
            assert ordinals == list(range(doc.chunk_count)), doc.source


def test_full_then_unchanged_run(pipeline: IngestPipeline, store: KnowledgeBaseStore, counting: MemoEmbedder, corpus: Path):
    first = pipeline.run(corpus, "kb1")
    files = [p for p in corpus.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert first.failed == 0, first.failures
    assert first.added == len(files) and first.chunks == counting.passages > len(files)
    assert first.total_chunks == first.chunks
    assert_consistent(store, "kb1")

    embedded = counting.passages
    second = pipeline.run(corpus, "kb1")
    assert (second.added, second.updated, second.deleted, second.chunks) == (0, 0, 0, 0)
    assert second.unchanged == len(files)
    assert counting.passages == embedded  # nothing re-embedded


def test_acl_file_and_cli_groups(pipeline: IngestPipeline, store: KnowledgeBaseStore, corpus: Path):
    pipeline.run(corpus, "kb1", groups=["staff"])
    docs = {d.source: json.loads(d.groups) for d in store.documents("kb1")}
    for source, groups in docs.items():
        if source.startswith("hr/"):
            assert groups == ["hr", "managers"]
        elif source.startswith("finance/"):
            assert groups == ["finance", "managers"]
        else:
            assert groups == ["staff"]
    with Session(store.engine) as session:  # the groups travel with every chunk
        for chunk in session.exec(select(ChunkRow).where(ChunkRow.kb == "kb1")):
            doc = session.get(DocumentRow, chunk.document_id)
            assert chunk.groups == doc.groups


def test_changed_deleted_and_regrouped_files(
    pipeline: IngestPipeline, store: KnowledgeBaseStore, counting: MemoEmbedder, corpus: Path
):
    pipeline.run(corpus, "kb1")
    before = {d.source: d for d in store.documents("kb1")}
    old_ids = set(store.chunk_ids("kb1").tolist())

    (corpus / "leave-policy.md").write_text("# Leave\n\nEmployees now get 40 days of annual leave.\n")
    (corpus / "holiday-calendar-2026.md").unlink()
    (corpus / ".enclave-acl.yaml").write_text(
        'rules:\n  - pattern: "hr/**"\n    groups: [hr]\n  - pattern: "finance/**"\n    groups: [finance, managers]\n'
    )
    hr_docs = [s for s in before if s.startswith("hr/")]
    embedded = counting.passages

    report = pipeline.run(corpus, "kb1")
    assert report.deleted == 1 and report.failed == 0
    assert report.updated == 1 + len(hr_docs)
    assert counting.passages - embedded == report.chunks == 1  # only the changed file was embedded
    after = {d.source: d for d in store.documents("kb1")}
    assert "holiday-calendar-2026.md" not in after
    assert after["leave-policy.md"].id == before["leave-policy.md"].id  # document ids are stable
    for source in hr_docs:
        assert json.loads(after[source].groups) == ["hr"]
    new_ids = set(store.chunk_ids("kb1").tolist())
    assert not (new_ids - old_ids) & set(range(min(old_ids)))  # ids only grow, never reused
    removed = old_ids - new_ids
    assert len(removed) == before["leave-policy.md"].chunk_count + before["holiday-calendar-2026.md"].chunk_count
    assert_consistent(store, "kb1")

    reader = Principal("reader", groups=("everyone",))
    hits = Retriever(store, counting).search("how many days of annual leave", "kb1", reader, top_k=1)
    assert hits[0].source == "leave-policy.md" and "40 days" in hits[0].text


def test_no_delete_keeps_missing_files(pipeline: IngestPipeline, store: KnowledgeBaseStore, corpus: Path):
    pipeline.run(corpus, "kb1")
    (corpus / "leave-policy.md").unlink()
    report = pipeline.run(corpus, "kb1", delete_missing=False)
    assert report.deleted == 0
    assert "leave-policy.md" in {d.source for d in store.documents("kb1")}


def test_corrupt_files_are_reported_and_skipped(pipeline: IngestPipeline, store: KnowledgeBaseStore, corpus: Path):
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is not really a pdf\n")
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n")  # a truncated image: OCR cannot read it
    (corpus / "drawing.svg").write_bytes(b"<svg/>")  # unsupported type
    report = pipeline.run(corpus, "kb1")
    failed = {f.source: f.reason for f in report.failures}
    assert set(failed) == {"broken.pdf", "binary.txt", "image.png"}
    assert failed["image.png"].startswith("corrupt image")
    assert all(reason.strip() for reason in failed.values())
    assert report.skipped == 1
    assert report.added > 5
    assert {"broken.pdf", "binary.txt"}.isdisjoint(d.source for d in store.documents("kb1"))

    # A document that becomes unreadable keeps its previously ingested version.
    before = {d.source: d.chunk_count for d in store.documents("kb1")}
    (corpus / "leave-policy.md").write_bytes(b"\x00\x01\x02" * 100)
    report = pipeline.run(corpus, "kb1")
    assert [f.source for f in report.failures] == ["binary.txt", "broken.pdf", "image.png", "leave-policy.md"]
    assert {d.source: d.chunk_count for d in store.documents("kb1")}["leave-policy.md"] == before["leave-policy.md"]
    assert_consistent(store, "kb1")


def test_remove_by_path_and_id(pipeline: IngestPipeline, store: KnowledgeBaseStore, corpus: Path):
    pipeline.run(corpus, "kb1")
    docs = {d.source: d for d in store.documents("kb1")}
    removed = pipeline.remove("kb1", str(corpus / "hr"))
    assert {d.source for d in removed} == {s for s in docs if s.startswith("hr/")}
    removed = pipeline.remove("kb1", str(docs["leave-policy.md"].id))
    assert [d.source for d in removed] == ["leave-policy.md"]
    assert pipeline.remove("kb1", "no/such/file.md") == []
    remaining = {d.source for d in store.documents("kb1")}
    assert "leave-policy.md" not in remaining and not any(s.startswith("hr/") for s in remaining)
    assert_consistent(store, "kb1")


def test_stale_index_is_reconciled_from_rows(pipeline: IngestPipeline, store: KnowledgeBaseStore, corpus: Path):
    """An index published before the last committed batch (a crash in between) is repaired on load."""
    pipeline.run(corpus, "kb1")
    directory = store.directory("kb1")
    stale_manifest = (directory.path / "manifest.json").read_bytes()
    stale = json.loads(stale_manifest)
    stale_files = {name: (directory.path / name).read_bytes() for name in (stale["vectors"], stale["lexical"])}

    (corpus / "leave-policy.md").write_text("# Leave\n\nThirty days of leave for everyone.\n")
    (corpus / "company-overview.md").unlink()
    pipeline.run(corpus, "kb1")
    # Put the old index back, as if the process had died right after its database commit.
    for name, data in stale_files.items():
        (directory.path / name).write_bytes(data)
    (directory.path / "manifest.json").write_bytes(stale_manifest)

    index, lexical, _ = store.load_indexes("kb1")
    assert np.array_equal(np.sort(index.ids()), store.chunk_ids("kb1"))
    assert np.array_equal(np.sort(lexical.ids()), store.chunk_ids("kb1"))
    with store.writer("kb1"):
        pass  # a writer publishes the reconciled index
    assert_consistent(store, "kb1")


def test_embedder_mismatch_is_refused(store: KnowledgeBaseStore, pipeline: IngestPipeline, corpus: Path):
    pipeline.run(corpus / "it", "kb1")
    other = KnowledgeBaseStore(store.engine, store.index_root, "bge-m3", 1024)
    with pytest.raises(KnowledgeBaseError, match="was built with embedder"):
        other.ensure_kb("kb1")
    with pytest.raises(KnowledgeBaseError, match="invalid knowledge base name"):
        store.ensure_kb("../etc")


def test_pii_redaction_before_indexing(store: KnowledgeBaseStore, counting: MemoEmbedder, tmp_path: Path):
    from security.pii import PiiRedactor

    folder = tmp_path / "pii"
    folder.mkdir()
    (folder / "contacts.md").write_text(
        "# Contacts for li.wei@corp.example.cn\n\nCall 13812345678 or pay to 4111 1111 1111 1111. "
        "ID 11010519491231002X. Order 4111111111111112 stays.\n")
    redacting = IngestPipeline(store, counting, Chunker(400, 80), default_groups=["everyone"], redact=PiiRedactor().redact)
    assert redacting.run(folder, "pii").added == 1
    (doc,) = store.documents("pii")
    texts = " ".join(c.text for c in store.chunks(store.chunk_ids("pii").tolist()).values())
    assert "[PHONE]" in texts and "[CARD]" in texts and "[CN_ID]" in texts and "4111111111111112" in texts
    assert "13812345678" not in texts and "11010519491231002X" not in texts and "li.wei@" not in texts + doc.title


def test_links_and_special_files_are_never_read(pipeline: IngestPipeline, store: KnowledgeBaseStore, tmp_path: Path):
    """A link inside the folder would give its target the groups of the link's place (HR text to
    everyone) or read outside the folder (/etc/passwd); a FIFO would block the run forever. None
    is read: each is reported as skipped with its reason, and a document that was a regular file
    before and is a link now is removed by deletion sync."""
    import os

    root = tmp_path / "share"
    (root / "hr").mkdir(parents=True)
    (root / "pub").mkdir()
    (root / ".enclave-acl.yaml").write_text('rules:\n  - pattern: "hr/**"\n    groups: [hr]\n')
    (root / "hr" / "b.md").write_text("# Salaries\n\nThe confidential salary band for level 7 is 91,000 to 104,000.\n")
    (root / "pub" / "notes.md").write_text("# Notes\n\nThe canteen opens at 11:30 on weekdays.\n")
    (root / "pub" / "b-link.md").write_text("# Placeholder\n\nA public page that will become a link.\n")
    pipeline.run(root, "kb1")
    assert "pub/b-link.md" in {d.source for d in store.documents("kb1")}

    (root / "pub" / "b-link.md").unlink()
    os.symlink("../hr/b.md", root / "pub" / "b-link.md")  # HR text under a public path
    os.symlink("/etc/passwd", root / "pub" / "passwd.txt")  # outside the folder
    os.symlink("..", root / "pub" / "loop")  # a folder loop
    os.mkfifo(root / "pub" / "fifo.txt")  # would block a reader forever
    report = pipeline.run(root, "kb1")

    docs = {d.source: json.loads(d.groups) for d in store.documents("kb1")}
    assert docs == {"hr/b.md": ["hr"], "pub/notes.md": ["everyone"]}
    reasons = {s.source: s.reason for s in report.skipped_files}
    assert set(reasons) == {"pub/b-link.md", "pub/passwd.txt", "pub/fifo.txt"}
    assert reasons["pub/b-link.md"].startswith("symbolic link") and reasons["pub/fifo.txt"] == "not a regular file"
    assert report.deleted == 1 and report.failed == 0
    with Session(store.engine) as session:
        texts = " ".join(c.text for c in session.exec(select(ChunkRow).where(ChunkRow.kb == "kb1")))
    assert "root:" not in texts
    everyone = Retriever(store, pipeline.embedder).search("salary band level 7", "kb1",
                                                           Principal(subject="u", groups=("everyone",)), 5)
    assert all(h.source != "pub/b-link.md" and "104,000" not in h.text for h in everyone)
    assert_consistent(store, "kb1")
