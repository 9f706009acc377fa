"""`ingest reindex`: rebuild a knowledge base's documents with the running chunker and embedder.

A change of chunker (sizes, contextual headers, a new CHUNKER_VERSION) or of embedder leaves the
documents already stored with chunks made the old way. Nothing rebuilds them behind the operator's
back: `ingest run` skips unchanged files and warns, search logs a warning, and this command
re-reads every stale document from its source file (``root/source``), chunks and embeds it again,
and replaces its chunks.

Resumable: documents are processed in batches of ``batch_files``, each committed in one
transaction that also records the document's new ``index_version``. A run killed at any point
leaves every document either fully old or fully new; the next run picks up exactly the documents
still stale. A document whose source file is gone is reported as failed and keeps its old chunks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from ingest.pipeline import (
    FileFailure, IngestPipeline, IngestReport, NoProgress, Progress, _Pending, attachment_parent, not_readable,
)
from retrieval.store import StoredDocument
from retrieval.tables import decode_groups
from security.integrity import sha256_file


def stale_documents(pipeline: IngestPipeline, kb: str, everything: bool = False) -> list[StoredDocument]:
    """The top-level documents of ``kb`` to rebuild (attachments go with their message)."""
    current = pipeline.store.index_version
    documents = pipeline.store.documents(kb)
    by_source = {(d.root, d.source): d for d in documents}
    chosen: dict[tuple[str, str], StoredDocument] = {}
    for doc in documents:
        if not everything and doc.index_version == current:
            continue
        parent = attachment_parent(doc.source)
        key = (doc.root, parent) if parent is not None else (doc.root, doc.source)
        if key in by_source:
            chosen[key] = by_source[key]
    return sorted(chosen.values(), key=lambda d: d.id)


def reindex(
    pipeline: IngestPipeline, kb: str, *, everything: bool = False, progress: Progress | None = None,
) -> IngestReport:
    """Re-chunk and re-embed the stale documents of ``kb`` (all of them with ``everything``)."""
    started = time.perf_counter()
    progress = progress or NoProgress()
    store = pipeline.store
    store.get_kb(kb)  # KnowledgeBaseNotFound for an unknown name
    # After an embedder change the knowledge base moves to the new model here, explicitly; every
    # document then is stale (its index_version names the old embedder) and is rebuilt below.
    store.switch_embedder(kb)
    todo = stale_documents(pipeline, kb, everything)
    report = IngestReport(kb=kb, root="")
    run_id = store.start_run(kb, "(reindex)")
    by_root: dict[str, list[StoredDocument]] = defaultdict(list)
    for doc in todo:
        by_root[doc.root].append(doc)
    status = "failed"
    try:
        progress.start(len(todo))
        with store.writer(kb, pipeline.checkpoint_seconds) as writer:
            for root, docs in by_root.items():
                part = IngestReport(kb=kb, root=root)
                stored_hash: dict[str, str] = {}
                stored_sources: set[str] = set()
                ocr_queue: list[_Pending] = []
                batch: list[_Pending] = []
                for doc in docs:
                    path = Path(root) / doc.source
                    reason = not_readable(path) if path.exists() or path.is_symlink() else "source file is gone"
                    if reason is not None:
                        part.failed += 1
                        part.failures.append(FileFailure(doc.source, f"{reason}; its old chunks are kept"))
                        progress.advance(files=1)
                        continue
                    batch.append(_Pending(path, doc.source, sha256_file(path), path.stat().st_size,
                                          decode_groups(doc.groups), doc))
                    if len(batch) >= pipeline.batch_files:
                        pipeline._process(batch, writer, part, progress, (stored_hash, stored_sources), ocr_queue)
                        batch = []
                pipeline._process(batch, writer, part, progress, (stored_hash, stored_sources), ocr_queue)
                for pending in ocr_queue:
                    pipeline._process([pending], writer, part, progress, (stored_hash, stored_sources), None)
                # Attachments the new reading of a message no longer yields go with the old reading.
                rebuilt = set(stored_hash)
                gone = [d.id for d in store.documents(kb, root=root)
                        if attachment_parent(d.source) in rebuilt and d.source not in stored_sources]
                writer.delete_documents(gone)
                _merge(report, part)
            report.total_chunks = len(writer.index)
        status = "finished"
    finally:
        progress.finish()
        report.seconds = time.perf_counter() - started
        store.finish_run(run_id, status, report.as_dict())
    return report


def _merge(total: IngestReport, part: IngestReport) -> None:
    for name in ("added", "updated", "unchanged", "deleted", "failed", "skipped", "chunks"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.failures.extend(FileFailure(f"{part.root}/{f.source}", f.reason) for f in part.failures)
    total.skipped_files.extend(FileFailure(f"{part.root}/{f.source}", f.reason) for f in part.skipped_files)
